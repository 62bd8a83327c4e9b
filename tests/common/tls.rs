//! TLS for the broker tests: a throwaway certificate authority, and a TLS front that terminates
//! TLS (optionally requiring a client certificate) before a plain-text broker.
//!
//! Tansu 0.6.0 cannot serve TLS itself: its `--cert` and `--key` are in one clap group that
//! allows only one of them, and `--cert` alone serves plain text. The front does what a TLS
//! load balancer does in front of a cluster, so the client side (librdkafka's handshake, server
//! verification, client certificates) is exercised for real; the broker sees plain Kafka.

use openssl::asn1::Asn1Time;
use openssl::bn::{BigNum, MsbOption};
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::ssl::{SslAcceptor, SslMethod, SslVerifyMode};
use openssl::x509::extension::{BasicConstraints, KeyUsage, SubjectAlternativeName};
use openssl::x509::{X509Name, X509};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

fn key() -> PKey<Private> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
    PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap()
}

fn name(cn: &str) -> X509Name {
    let mut n = X509Name::builder().unwrap();
    n.append_entry_by_nid(Nid::COMMONNAME, cn).unwrap();
    n.build()
}

/// A certificate for `cn`, signed by `issuer` (self-signed when `None`), valid for a day.
fn certificate(
    cn: &str,
    key: &PKey<Private>,
    issuer: Option<(&X509, &PKey<Private>)>,
    ca: bool,
) -> X509 {
    let mut b = X509::builder().unwrap();
    b.set_version(2).unwrap();
    let mut serial = BigNum::new().unwrap();
    serial.rand(64, MsbOption::MAYBE_ZERO, false).unwrap();
    b.set_serial_number(&serial.to_asn1_integer().unwrap())
        .unwrap();
    let subject = name(cn);
    b.set_subject_name(&subject).unwrap();
    b.set_issuer_name(issuer.map_or(&subject, |(c, _)| c.subject_name()))
        .unwrap();
    b.set_pubkey(key).unwrap();
    b.set_not_before(&Asn1Time::days_from_now(0).unwrap())
        .unwrap();
    b.set_not_after(&Asn1Time::days_from_now(1).unwrap())
        .unwrap();
    if ca {
        b.append_extension(BasicConstraints::new().critical().ca().build().unwrap())
            .unwrap();
        b.append_extension(
            KeyUsage::new()
                .critical()
                .key_cert_sign()
                .crl_sign()
                .build()
                .unwrap(),
        )
        .unwrap();
    } else {
        let san = SubjectAlternativeName::new()
            .ip("127.0.0.1")
            .dns("localhost")
            .build(&b.x509v3_context(issuer.map(|(c, _)| c.as_ref()), None))
            .unwrap();
        b.append_extension(san).unwrap();
    }
    b.sign(issuer.map_or(key, |(_, k)| k), MessageDigest::sha256())
        .unwrap();
    b.build()
}

/// PEM files of a throwaway PKI in a directory: `ca.pem` (the authority the clients trust),
/// `server.pem`/`server.key` (for 127.0.0.1 and localhost), `client.pem`/`client.key` (signed by
/// the same authority), and `other-ca.pem`, an authority that signed nothing here.
pub struct Pki {
    pub dir: PathBuf,
    ca: X509,
    server: (X509, PKey<Private>),
}

impl Pki {
    pub fn generate(dir: &Path) -> Pki {
        let ca_key = key();
        let ca = certificate("segstream test CA", &ca_key, None, true);
        let server_key = key();
        let server = certificate("127.0.0.1", &server_key, Some((&ca, &ca_key)), false);
        let client_key = key();
        let client = certificate("segstream", &client_key, Some((&ca, &ca_key)), false);
        let other_key = key();
        let other = certificate("another CA", &other_key, None, true);
        let write = |file: &str, pem: Vec<u8>| std::fs::write(dir.join(file), pem).unwrap();
        write("ca.pem", ca.to_pem().unwrap());
        write("other-ca.pem", other.to_pem().unwrap());
        write("server.pem", server.to_pem().unwrap());
        write("server.key", server_key.private_key_to_pem_pkcs8().unwrap());
        write("client.pem", client.to_pem().unwrap());
        write("client.key", client_key.private_key_to_pem_pkcs8().unwrap());
        Pki {
            dir: dir.to_owned(),
            ca,
            server: (server, server_key),
        }
    }

    pub fn path(&self, file: &str) -> String {
        self.dir.join(file).display().to_string()
    }

    /// librdkafka properties of a client that trusts this authority, with its client
    /// certificate when `client_cert`.
    pub fn client_properties(&self, client_cert: bool) -> Vec<(String, String)> {
        let mut p = vec![
            ("security.protocol".to_owned(), "SSL".to_owned()),
            ("ssl.ca.location".to_owned(), self.path("ca.pem")),
        ];
        if client_cert {
            p.push(("ssl.certificate.location".into(), self.path("client.pem")));
            p.push(("ssl.key.location".into(), self.path("client.key")));
        }
        p
    }

    fn acceptor(&self, require_client_cert: bool) -> SslAcceptor {
        let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server()).unwrap();
        b.set_certificate(&self.server.0).unwrap();
        b.set_private_key(&self.server.1).unwrap();
        b.check_private_key().unwrap();
        if require_client_cert {
            b.cert_store_mut().add_cert(self.ca.clone()).unwrap();
            b.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
        }
        b.build()
    }
}

/// Listens on `listen` (127.0.0.1), terminates TLS and relays each connection to the plain-text
/// broker on `upstream`. Handshakes that fail (an untrusted or missing client certificate, a
/// plain-text client) close the connection, as a TLS listener does. Stops with the runtime.
pub async fn front(pki: &Pki, listen: u16, upstream: u16, require_client_cert: bool) {
    let acceptor = Arc::new(pki.acceptor(require_client_cert));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", listen))
        .await
        .unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let ssl = openssl::ssl::Ssl::new(acceptor.context()).unwrap();
                let mut tls = tokio_openssl::SslStream::new(ssl, tcp).unwrap();
                if Pin::new(&mut tls).accept().await.is_err() {
                    return;
                }
                let Ok(mut broker) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut broker).await;
            });
        }
    });
}
