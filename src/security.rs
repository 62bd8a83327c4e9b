//! How segstream's clients authenticate to the cluster and protect the connection: librdkafka's
//! own properties (`security.protocol`, `sasl.*`, `ssl.*` in `kafka.properties`), read once into a
//! checked [`Security`]. Pure: no files are opened and no client is built here (see
//! `kafka::check_clients` for what only librdkafka can tell).

use std::collections::BTreeMap;

/// `security.protocol`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

/// `sasl.mechanism` (librdkafka also reads it as `sasl.mechanisms`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mechanism {
    Plain,
    ScramSha256,
    ScramSha512,
    OAuthBearer,
}

/// The checked security settings of every client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Security {
    pub protocol: Protocol,
    /// Set exactly when the protocol uses SASL.
    pub mechanism: Option<Mechanism>,
}

impl Security {
    pub fn tls(&self) -> bool {
        matches!(self.protocol, Protocol::Ssl | Protocol::SaslSsl)
    }

    /// The librdkafka `builtin.features` this needs.
    pub fn features(&self) -> Vec<&'static str> {
        let mut f = Vec::new();
        if self.tls() {
            f.push("ssl");
        }
        match self.mechanism {
            Some(Mechanism::Plain) => f.push("sasl_plain"),
            Some(Mechanism::ScramSha256 | Mechanism::ScramSha512) => f.push("sasl_scram"),
            Some(Mechanism::OAuthBearer) => f.push("sasl_oauthbearer"),
            None => {}
        }
        f
    }

    /// One line for logs: `SASL_SSL/SCRAM-SHA-512`, `SSL`, `PLAINTEXT`.
    pub fn describe(&self) -> String {
        let protocol = protocol_name(self.protocol);
        match self.mechanism {
            None => protocol.to_owned(),
            Some(m) => format!("{protocol}/{}", mechanism_name(m)),
        }
    }
}

fn protocol_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Plaintext => "PLAINTEXT",
        Protocol::Ssl => "SSL",
        Protocol::SaslPlaintext => "SASL_PLAINTEXT",
        Protocol::SaslSsl => "SASL_SSL",
    }
}

fn mechanism_name(m: Mechanism) -> &'static str {
    match m {
        Mechanism::Plain => "PLAIN",
        Mechanism::ScramSha256 => "SCRAM-SHA-256",
        Mechanism::ScramSha512 => "SCRAM-SHA-512",
        Mechanism::OAuthBearer => "OAUTHBEARER",
    }
}

/// Why the security properties were refused; each message names the property.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum SecurityError {
    #[error("kafka.{map}.\"{key}\": security properties must apply to every client (consumer, producer, admin, changelog and model readers); set it in kafka.properties")]
    NotForEveryClient { map: &'static str, key: String },
    #[error("kafka.properties.\"security.protocol\": `{0}` is not one of PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL")]
    Protocol(String),
    #[error("kafka.properties.\"sasl.mechanism\": `{0}` is not one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, OAUTHBEARER (GSSAPI/Kerberos is not built into this binary)")]
    Mechanism(String),
    #[error("kafka.properties: \"sasl.mechanism\" = `{0}` and \"sasl.mechanisms\" = `{1}` disagree; set one of them")]
    TwoMechanisms(String, String),
    #[error("kafka.properties.\"sasl.mechanism\": must be set with security.protocol {0} (librdkafka would pick GSSAPI/Kerberos, which this binary does not include)")]
    NoMechanism(&'static str),
    #[error("kafka.properties.\"{key}\": must be set (and not empty) for SASL {mechanism}")]
    Credential {
        mechanism: &'static str,
        key: &'static str,
    },
    #[error("kafka.properties.\"sasl.oauthbearer.method\": `oidc` needs librdkafka's OIDC support (libcurl), which this binary does not include; the default method needs a token callback that segstream does not have, so only \"enable.sasl.oauthbearer.unsecure.jwt\" = \"true\" (test clusters) works")]
    OAuthBearer,
    #[error("kafka.properties: `{0}` is set without `{1}`; a client certificate needs both")]
    HalfCertificate(&'static str, &'static str),
    #[error(
        "kafka.properties.\"{0}\": is set but security.protocol is {1}, which does not use it"
    )]
    Unused(String, &'static str),
}

/// Properties that say how to reach and trust the cluster.
fn is_security_key(key: &str) -> bool {
    key == "security.protocol" || key.starts_with("sasl.") || key.starts_with("ssl.")
}

/// CA settings; without any, TLS clients look for the system's CA bundle (see [`checked`]).
const CA_KEYS: [&str; 3] = ["ssl.ca.location", "ssl.ca.pem", "ssl.ca.certificate.stores"];

/// Reads and checks the security properties. `every` is `kafka.properties`; the consumer's and
/// producer's own maps must not carry security keys, since the other clients would not see them.
pub(crate) fn checked(
    every: &BTreeMap<String, String>,
    consumer: &BTreeMap<String, String>,
    producer: &BTreeMap<String, String>,
) -> Result<Security, SecurityError> {
    for (map, props) in [
        ("consumer_properties", consumer),
        ("producer_properties", producer),
    ] {
        if let Some(key) = props.keys().find(|k| is_security_key(k)) {
            return Err(SecurityError::NotForEveryClient {
                map,
                key: key.clone(),
            });
        }
    }
    let get = |k: &str| every.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
    let protocol = match get("security.protocol")
        .unwrap_or("plaintext")
        .to_ascii_lowercase()
        .as_str()
    {
        "plaintext" => Protocol::Plaintext,
        "ssl" => Protocol::Ssl,
        "sasl_plaintext" => Protocol::SaslPlaintext,
        "sasl_ssl" => Protocol::SaslSsl,
        other => return Err(SecurityError::Protocol(other.to_owned())),
    };
    let sasl = matches!(protocol, Protocol::SaslPlaintext | Protocol::SaslSsl);
    let tls = matches!(protocol, Protocol::Ssl | Protocol::SaslSsl);
    let name = protocol_name(protocol);
    let mechanism = if sasl {
        Some(mechanism(every, name)?)
    } else {
        if let Some(key) = every.keys().find(|k| k.starts_with("sasl.")) {
            return Err(SecurityError::Unused(key.clone(), name));
        }
        None
    };
    for (a, b) in [
        ("ssl.certificate.location", "ssl.key.location"),
        ("ssl.key.location", "ssl.certificate.location"),
        ("ssl.certificate.pem", "ssl.key.pem"),
        ("ssl.key.pem", "ssl.certificate.pem"),
    ] {
        if get(a).is_some() && get(b).is_none() {
            return Err(SecurityError::HalfCertificate(a, b));
        }
    }
    if !tls {
        let uses_tls = every.keys().find(|k| {
            k.starts_with("ssl.") && k.as_str() != "ssl.endpoint.identification.algorithm"
        });
        if let Some(key) = uses_tls {
            return Err(SecurityError::Unused(key.clone(), name));
        }
    }
    Ok(Security {
        protocol,
        mechanism,
    })
}

fn mechanism(
    every: &BTreeMap<String, String>,
    protocol: &'static str,
) -> Result<Mechanism, SecurityError> {
    let get = |k: &str| every.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
    let value = match (get("sasl.mechanism"), get("sasl.mechanisms")) {
        (Some(a), Some(b)) if !a.eq_ignore_ascii_case(b) => {
            return Err(SecurityError::TwoMechanisms(a.into(), b.into()))
        }
        (Some(v), _) | (None, Some(v)) => v,
        (None, None) => return Err(SecurityError::NoMechanism(protocol)),
    };
    let m = match value.to_ascii_uppercase().as_str() {
        "PLAIN" => Mechanism::Plain,
        "SCRAM-SHA-256" => Mechanism::ScramSha256,
        "SCRAM-SHA-512" => Mechanism::ScramSha512,
        "OAUTHBEARER" => Mechanism::OAuthBearer,
        _ => return Err(SecurityError::Mechanism(value.into())),
    };
    match m {
        Mechanism::OAuthBearer => {
            let oidc =
                get("sasl.oauthbearer.method").is_some_and(|v| v.eq_ignore_ascii_case("oidc"));
            let unsecured = get("enable.sasl.oauthbearer.unsecure.jwt") == Some("true");
            if oidc || !unsecured {
                return Err(SecurityError::OAuthBearer);
            }
        }
        _ => {
            for key in ["sasl.username", "sasl.password"] {
                if get(key).is_none() {
                    return Err(SecurityError::Credential {
                        mechanism: mechanism_name(m),
                        key,
                    });
                }
            }
        }
    }
    Ok(m)
}

/// The CA property to add when TLS is on and no CA is configured: librdkafka then probes the
/// usual system bundle paths. (The OpenSSL built into this binary has no default trust store
/// of its own, so without this a public-CA cluster could not be verified.)
pub(crate) fn default_ca(
    security: &Security,
    every: &BTreeMap<String, String>,
) -> Option<(String, String)> {
    let has_ca = CA_KEYS.iter().any(|k| every.contains_key(*k));
    (security.tls() && !has_ca).then(|| ("ssl.ca.location".to_owned(), "probe".to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn check(pairs: &[(&str, &str)]) -> Result<Security, SecurityError> {
        checked(&props(pairs), &BTreeMap::new(), &BTreeMap::new())
    }

    #[test]
    fn no_properties_is_plaintext() {
        let s = check(&[]).unwrap();
        assert_eq!(s.protocol, Protocol::Plaintext);
        assert!(s.features().is_empty());
        assert_eq!(default_ca(&s, &BTreeMap::new()), None);
    }

    #[test]
    fn sasl_ssl_with_scram_needs_ssl_and_scram_and_gets_the_system_ca_bundle() {
        let p = [
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanisms", "SCRAM-SHA-512"),
            ("sasl.username", "segstream"),
            ("sasl.password", "pw"),
        ];
        let s = check(&p).unwrap();
        assert_eq!(s.mechanism, Some(Mechanism::ScramSha512));
        assert_eq!(s.features(), ["ssl", "sasl_scram"]);
        assert_eq!(s.describe(), "SASL_SSL/SCRAM-SHA-512");
        assert_eq!(
            default_ca(&s, &props(&p)),
            Some(("ssl.ca.location".into(), "probe".into()))
        );
        let mut with_ca = props(&p);
        with_ca.insert("ssl.ca.location".into(), "/etc/ca.pem".into());
        assert_eq!(default_ca(&s, &with_ca), None);
    }

    #[test]
    fn sasl_without_a_mechanism_or_credentials_is_refused() {
        assert_eq!(
            check(&[("security.protocol", "sasl_plaintext")]),
            Err(SecurityError::NoMechanism("SASL_PLAINTEXT"))
        );
        assert!(matches!(
            check(&[
                ("security.protocol", "SASL_SSL"),
                ("sasl.mechanism", "PLAIN"),
                ("sasl.username", "u"),
            ]),
            Err(SecurityError::Credential {
                key: "sasl.password",
                ..
            })
        ));
        assert!(matches!(
            check(&[
                ("security.protocol", "SASL_SSL"),
                ("sasl.mechanism", "GSSAPI")
            ]),
            Err(SecurityError::Mechanism(_))
        ));
    }

    #[test]
    fn oauthbearer_is_refused_unless_it_can_work_without_a_token_callback() {
        let base = [
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanism", "OAUTHBEARER"),
        ];
        assert_eq!(check(&base), Err(SecurityError::OAuthBearer));
        let mut oidc = base.to_vec();
        oidc.push(("sasl.oauthbearer.method", "oidc"));
        assert_eq!(check(&oidc), Err(SecurityError::OAuthBearer));
        let mut unsecured = base.to_vec();
        unsecured.push(("enable.sasl.oauthbearer.unsecure.jwt", "true"));
        assert_eq!(
            check(&unsecured).unwrap().features(),
            ["ssl", "sasl_oauthbearer"]
        );
    }

    #[test]
    fn mistakes_a_platform_team_makes_are_named() {
        assert!(matches!(
            check(&[("security.protocol", "TLS")]),
            Err(SecurityError::Protocol(p)) if p == "tls"
        ));
        assert!(matches!(
            check(&[
                ("security.protocol", "SSL"),
                ("ssl.certificate.location", "/c.pem")
            ]),
            Err(SecurityError::HalfCertificate(
                "ssl.certificate.location",
                _
            ))
        ));
        assert!(matches!(
            check(&[("ssl.ca.location", "/ca.pem")]),
            Err(SecurityError::Unused(k, "PLAINTEXT")) if k == "ssl.ca.location"
        ));
        assert!(matches!(
            check(&[("sasl.username", "u")]),
            Err(SecurityError::Unused(k, "PLAINTEXT")) if k == "sasl.username"
        ));
        let only_consumer = props(&[("security.protocol", "SSL")]);
        assert!(matches!(
            checked(&BTreeMap::new(), &only_consumer, &BTreeMap::new()),
            Err(SecurityError::NotForEveryClient {
                map: "consumer_properties",
                ..
            })
        ));
    }
}
