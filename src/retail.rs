//! Turns the UCI Online Retail data set (CSV, optionally gzipped) into purchase events (NDJSON)
//! for replay. Real data is dirty; every rule below is applied explicitly and every row it refuses
//! is counted and written to the rejects file with its reason (nothing is dropped silently):
//!
//! - a row without CustomerID cannot be attributed to a user: `missing_customer_id`;
//! - invoices starting with `A` are bad-debt adjustments, not purchases: `adjustment`;
//! - invoices starting with `C` are cancellations: their negative quantities become positive
//!   quantities of a `cancelled` event (a non-negative quantity there is `bad_quantity`);
//! - other rows need Quantity > 0 (stock corrections otherwise): `non_positive_quantity`;
//! - UnitPrice < 0: `negative_price`; UnitPrice = 0 is kept (free items, samples);
//! - rows are grouped into one event per invoice, stamped with the invoice's time (UTC);
//!   category = the product type a merchandiser would file the item under: the description's
//!   head noun, i.e. its last word that is not a modifier (a colour, size, material, pattern or
//!   pack word: [`MODIFIERS`]; nor a word with digits), singularised ("JUMBO BAG PINK POLKADOT"
//!   is a `bag`, "SET OF 3 CAKE TINS PANTRY DESIGN" a `pantry`: pattern names not in the list
//!   stay); `service` for non-product codes (postage, fees, manual adjustments), `unknown`
//!   without a description or a noun. The data has no category column; taking the plain last
//!   word made colours and patterns categories (`cross_sell:pink`).

use crate::event::{LineItem, OrderStatus, PurchaseEvent};
use anyhow::Context;
use chrono::NaiveDateTime;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::Path;

#[derive(Debug, Clone, Deserialize)]
pub struct Row {
    #[serde(rename = "InvoiceNo")]
    pub invoice: String,
    #[serde(rename = "StockCode")]
    pub stock_code: String,
    #[serde(rename = "Description")]
    pub description: String,
    #[serde(rename = "Quantity")]
    pub quantity: i64,
    #[serde(rename = "InvoiceDate")]
    pub date: String,
    #[serde(rename = "UnitPrice")]
    pub unit_price: f64,
    #[serde(rename = "CustomerID")]
    pub customer: String,
}

/// A refused row and why.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Reject {
    pub invoice: String,
    pub stock_code: String,
    pub reason: &'static str,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct RetailReport {
    pub rows: u64,
    pub events: u64,
    pub cancellations: u64,
    pub rejected: BTreeMap<&'static str, u64>,
}

fn is_missing(s: &str) -> bool {
    let s = s.trim();
    s.is_empty() || s == "NA"
}

/// Words that qualify a product rather than name its type: colours, sizes, materials and
/// finishes, patterns and designs, and pack words.
const MODIFIERS: &[&str] = &[
    // colours
    "pink",
    "red",
    "blue",
    "white",
    "black",
    "green",
    "cream",
    "ivory",
    "gold",
    "silver",
    "yellow",
    "purple",
    "orange",
    "brown",
    "grey",
    "gray",
    "natural",
    "pastel",
    "colour",
    "colours",
    "coloured",
    "multicolour",
    "assorted",
    "mixed",
    // sizes
    "small",
    "large",
    "mini",
    "medium",
    "big",
    "jumbo",
    "giant",
    "tall",
    "tiny",
    "tier",
    // materials and finishes
    "finish",
    "glitter",
    "wooden",
    "wood",
    "metal",
    "glass",
    "ceramic",
    "zinc",
    "enamel",
    "rustic",
    "antique",
    "vintage",
    // patterns and designs
    "design",
    "retrospot",
    "polkadot",
    "polka",
    "dot",
    "spotty",
    "spot",
    "paisley",
    "floral",
    "flower",
    "stripe",
    "striped",
    "gingham",
    "woodland",
    "spaceboy",
    "skull",
    "christmas",
    "xmas",
    "heart",
    "star",
    "london",
    "apple",
    "leaf",
    "cherry",
    "strawberry",
    "owl",
    "bird",
    // pack words
    "set",
    "of",
    "pack",
    "kit",
    "piece",
    "pcs",
];

/// A plural's singular, by English spelling rules (boxes → box, doilies → doily, bags → bag).
fn singular(w: &str) -> String {
    if let Some(stem) = w.strip_suffix("ies").filter(|s| s.len() > 1) {
        return format!("{stem}y");
    }
    for suffix in ["ches", "shes", "xes", "sses"] {
        if w.ends_with(suffix) {
            return w[..w.len() - 2].to_owned();
        }
    }
    match w.strip_suffix('s') {
        Some(stem) if !w.ends_with("ss") && w.len() > 3 => stem.to_owned(),
        _ => w.to_owned(),
    }
}

fn category(row: &Row) -> String {
    if !row.stock_code.starts_with(|c: char| c.is_ascii_digit()) {
        return "service".into();
    }
    if is_missing(&row.description) {
        return "unknown".into();
    }
    row.description
        .split_whitespace()
        .rev()
        .map(|w| {
            w.trim_matches(|c: char| !c.is_alphanumeric())
                .to_lowercase()
        })
        .filter(|w| !w.is_empty() && w.chars().all(char::is_alphabetic))
        .map(|w| singular(&w))
        .find(|w| !MODIFIERS.contains(&w.as_str()))
        .unwrap_or_else(|| "unknown".into())
}

fn parse_time(s: &str) -> Option<i64> {
    NaiveDateTime::parse_from_str(s.trim(), "%Y-%m-%d %H:%M:%S")
        .ok()
        .map(|t| t.and_utc().timestamp_millis())
}

/// Applies the rules to rows (in file order); returns events sorted by time, and the rejects.
pub(crate) fn invoices(rows: impl IntoIterator<Item = Row>) -> (Vec<PurchaseEvent>, Vec<Reject>) {
    let mut order: Vec<String> = Vec::new();
    let mut by_invoice: HashMap<String, PurchaseEvent> = HashMap::new();
    let mut rejects = Vec::new();
    for row in rows {
        let reject = |reason| Reject {
            invoice: row.invoice.clone(),
            stock_code: row.stock_code.clone(),
            reason,
        };
        let cancelled = row.invoice.starts_with('C');
        let quantity = if cancelled {
            -row.quantity
        } else {
            row.quantity
        };
        let customer = row.customer.trim().trim_end_matches(".0");
        let problem = if is_missing(customer) {
            Some("missing_customer_id")
        } else if row.invoice.starts_with('A') {
            Some("adjustment")
        } else if cancelled && quantity <= 0 {
            Some("bad_quantity")
        } else if quantity <= 0 {
            Some("non_positive_quantity")
        } else if !(row.unit_price.is_finite() && row.unit_price >= 0.0) {
            Some("negative_price")
        } else if i32::try_from(quantity).is_err() {
            Some("bad_quantity")
        } else {
            None
        };
        let time = parse_time(&row.date);
        let problem = problem.or(time.is_none().then_some("bad_date"));
        if let Some(reason) = problem {
            rejects.push(reject(reason));
            continue;
        }
        let item = LineItem {
            product_id: row.stock_code.clone(),
            category: category(&row),
            quantity: quantity as i32,
            unit_price: row.unit_price,
            description: (!is_missing(&row.description)).then(|| row.description.trim().to_owned()),
        };
        let amount = quantity as f64 * row.unit_price;
        match by_invoice.get_mut(&row.invoice) {
            Some(e) => {
                e.total += amount;
                e.items.push(item);
            }
            None => {
                order.push(row.invoice.clone());
                by_invoice.insert(
                    row.invoice.clone(),
                    PurchaseEvent {
                        event_id: format!("retail-{}", row.invoice),
                        user_id: customer.to_owned(),
                        event_time: time.unwrap_or_default(),
                        order_id: row.invoice.trim_start_matches('C').to_owned(),
                        status: if cancelled {
                            OrderStatus::Cancelled
                        } else {
                            OrderStatus::Placed
                        },
                        items: vec![item],
                        total: amount,
                        currency: "GBP".into(),
                    },
                );
            }
        }
    }
    let mut events: Vec<PurchaseEvent> = order
        .into_iter()
        .filter_map(|i| by_invoice.remove(&i))
        .map(|mut e| {
            e.total = (e.total * 100.0).round() / 100.0;
            e
        })
        .collect();
    events.sort_by_key(|e| e.event_time);
    (events, rejects)
}

/// Reads `input` (gzip if it ends in `.gz`), writes events to `output` and rejects to `rejects`.
pub fn convert(
    input: &Path,
    output: &Path,
    rejects: Option<&Path>,
) -> anyhow::Result<RetailReport> {
    let file = File::open(input).with_context(|| format!("opening {}", input.display()))?;
    let reader: Box<dyn Read> = if input.extension().is_some_and(|e| e == "gz") {
        Box::new(flate2::read::GzDecoder::new(file))
    } else {
        Box::new(file)
    };
    let mut csv = csv::Reader::from_reader(BufReader::new(reader));
    let mut rows = Vec::new();
    for row in csv.deserialize() {
        rows.push(row.context("reading a csv row")?);
    }
    let n = rows.len() as u64;
    let (events, refused) = invoices(rows);
    let mut w = BufWriter::new(File::create(output)?);
    for e in &events {
        serde_json::to_writer(&mut w, e)?;
        w.write_all(b"\n")?;
    }
    w.flush()?;
    if let Some(path) = rejects {
        let mut w = BufWriter::new(File::create(path)?);
        for r in &refused {
            serde_json::to_writer(&mut w, r)?;
            w.write_all(b"\n")?;
        }
        w.flush()?;
    }
    let mut report = RetailReport {
        rows: n,
        events: events.len() as u64,
        cancellations: events
            .iter()
            .filter(|e| e.status == OrderStatus::Cancelled)
            .count() as u64,
        rejected: BTreeMap::new(),
    };
    for r in &refused {
        *report.rejected.entry(r.reason).or_default() += 1;
    }
    Ok(report)
}

/// Reads NDJSON purchase events (as written by [`convert`]).
pub fn read_events(path: &Path) -> anyhow::Result<Vec<PurchaseEvent>> {
    let f = BufReader::new(File::open(path)?);
    f.lines().map(|l| Ok(serde_json::from_str(&l?)?)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(inv: &str, code: &str, desc: &str, q: i64, price: f64, cust: &str) -> Row {
        Row {
            invoice: inv.into(),
            stock_code: code.into(),
            description: desc.into(),
            quantity: q,
            date: "2010-12-01 08:26:00".into(),
            unit_price: price,
            customer: cust.into(),
        }
    }

    #[test]
    fn the_documented_rules() {
        let rows = vec![
            row(
                "536365",
                "85123A",
                "WHITE HANGING HEART T-LIGHT HOLDER",
                6,
                2.55,
                "17850",
            ),
            row("536365", "71053", "WHITE METAL LANTERN", 6, 3.39, "17850"),
            row("536365", "POST", "POSTAGE", 1, 18.0, "17850"),
            row("C536379", "D", "Discount", -1, 27.5, "14527"),
            row("536414", "22139", "NA", 56, 0.0, "NA"),
            row("A563185", "B", "Adjust bad debt", 1, -11062.06, ""),
            row("536999", "22139", "damaged", -5, 0.0, "12345"),
            row("537000", "22139", "MUG", 2, -1.0, "12345"),
        ];
        let (events, rejects) = invoices(rows);
        assert_eq!(events.len(), 2);
        let placed = &events[0];
        assert_eq!(placed.user_id, "17850");
        assert_eq!(placed.items.len(), 3);
        assert_eq!(placed.items[0].category, "holder");
        assert_eq!(placed.items[2].category, "service");
        let named = |d: &str| category(&row("1", "22139", d, 1, 1.0, "1"));
        assert_eq!(named("JUMBO BAG PINK POLKADOT"), "bag");
        assert_eq!(named("SET OF 6 SPICE TINS PANTRY DESIGN"), "pantry");
        assert_eq!(named("PACK OF 72 RETROSPOT CAKE CASES"), "case");
        assert_eq!(named("LUNCH BOXES RED"), "box");
        assert_eq!(named("PINK 50s"), "unknown");
        assert!((placed.total - (6.0 * 2.55 + 6.0 * 3.39 + 18.0)).abs() < 1e-9);
        assert_eq!(placed.event_time, 1_291_191_960_000);
        let cancel = &events[1];
        assert_eq!(cancel.status, OrderStatus::Cancelled);
        assert_eq!(cancel.items[0].quantity, 1);
        assert_eq!(cancel.order_id, "536379");
        let reasons: Vec<_> = rejects.iter().map(|r| r.reason).collect();
        assert_eq!(
            reasons,
            [
                "missing_customer_id",
                "missing_customer_id",
                "non_positive_quantity",
                "negative_price"
            ]
        );
        // Every produced event passes the service's own validation.
        for e in events {
            crate::decode::validate(&crate::event::Event::Purchase(e)).unwrap();
        }
    }
}
