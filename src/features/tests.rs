use super::layout::*;
use super::state::*;
use super::text::*;
use super::vector::*;
use super::*;
use crate::event::{
    ClickEvent, ClickKind, Event, LineItem, OrderStatus, PurchaseEvent, SocialAction, SocialEvent,
};
use approx::assert_relative_eq;
use proptest::prelude::*;
use serde::{Deserialize, Serialize};
use wide::f64x4;

const DAY: i64 = 86_400_000;

/// `ln_1p4(x)` against `f64::ln_1p`, lane by lane: within 2 ulp, and infinite for an
/// infinite input (the vector then zeroes it, as it did before).
fn assert_ln_1p4_is_ln_1p(lanes: [f64; 4]) {
    for (x, y) in lanes.iter().zip(ln_1p4(f64x4::from(lanes)).to_array()) {
        let want = x.ln_1p();
        if want.is_finite() {
            let tolerance = 2.0 * f64::EPSILON * want.abs();
            assert!(
                (y - want).abs() <= tolerance,
                "ln(1 + {x:e}) = {y:e}, not {want:e}"
            );
        } else {
            assert_eq!(y, want, "ln(1 + {x:e})");
        }
    }
}

/// Over the whole range the vector feeds it: zero, subnormals, values that vanish next
/// to 1, fractions, counts, money, the largest finite value, infinity.
#[test]
fn log_scaling_four_at_a_time_is_ln_1p() {
    let mut xs = vec![
        0.0,
        5e-324,
        f64::MIN_POSITIVE,
        1e-17,
        f64::EPSILON,
        f64::MAX,
    ];
    xs.push(f64::INFINITY);
    for e in -320..=308 {
        for m in [1.0, 1.234_567, 3.9, 7.77] {
            xs.push(m * 10f64.powi(e));
        }
    }
    for chunk in xs.chunks(4) {
        let mut lanes = [0.0; 4];
        lanes[..chunk.len()].copy_from_slice(chunk);
        assert_ln_1p4_is_ln_1p(lanes);
    }
}

/// The log-scaled components are the rates, counts, amounts and durations; the shares,
/// the rating and the sentiment are not (they are bounded or signed).
#[test]
fn log_scaled_components_are_the_counts_and_amounts() {
    let names: Vec<_> = LOG_SCALED.iter().map(|&i| feature_name(i)).collect();
    let mut want: Vec<_> = (0..B_PURCHASE).map(feature_name).collect();
    want.extend([
        "recency_days",
        "frequency",
        "monetary",
        "basket_size",
        "avg_unit_price",
        "lifetime_orders",
        "tenure_days",
        "engagements",
        "reviews",
    ]);
    assert_eq!(names, want);
    assert!(names[..B_PURCHASE].iter().all(|n| n.contains("_per_day_")));
}

/// An open label window keeps its features as `f16` in memory but in the changelog's
/// format of before (`f64`): records written by earlier versions restore, and new ones
/// read the same.
#[test]
fn label_windows_keep_the_changelog_format() {
    #[derive(Serialize, Deserialize)]
    struct Before {
        start_ms: i64,
        x: Vec<f64>,
        spend: f64,
    }
    let x: Vec<f64> = (0..DIM).map(|i| i as f64 * 0.25 - 3.5).collect();
    let before = postcard::to_stdvec(&Before {
        start_ms: 17,
        x: x.clone(),
        spend: 9.5,
    })
    .unwrap();
    let w: LabelWindow = postcard::from_bytes(&before).unwrap();
    assert_eq!(w.start_ms, 17);
    assert_eq!(w.spend, 9.5);
    assert_eq!(w.features().to_vec(), x);
    assert_eq!(postcard::to_stdvec(&w).unwrap(), before);
    // Values f16 cannot hold exactly come back within its precision (2^-11 relative), and
    // a restored window writes what it holds, so restoring it again changes nothing.
    let odd: Vec<f64> = (0..DIM).map(|i| (i as f64 + 1.0) / 3.0 * 7.1).collect();
    let w: LabelWindow = postcard::from_bytes(
        &postcard::to_stdvec(&Before {
            start_ms: 1,
            x: odd.clone(),
            spend: 0.0,
        })
        .unwrap(),
    )
    .unwrap();
    for (got, want) in w.features().iter().zip(&odd) {
        assert!(
            (got - want).abs() <= want.abs() * 2f64.powi(-11),
            "{got} vs {want}"
        );
    }
    let again: LabelWindow = postcard::from_bytes(&postcard::to_stdvec(&w).unwrap()).unwrap();
    assert_eq!(again, w);
    let short = Before {
        start_ms: 1,
        x: vec![0.0; DIM - 1],
        spend: 0.0,
    };
    assert!(postcard::from_bytes::<LabelWindow>(&postcard::to_stdvec(&short).unwrap()).is_err());
}

fn params() -> FeatureParams {
    FeatureParams::new([DAY as f64, 7.0 * DAY as f64, 30.0 * DAY as f64], 1)
}

fn token_list(text: &str) -> Vec<String> {
    let mut got = Vec::new();
    for_each_token(text, |t| got.push(t.to_owned()));
    got
}

fn reference_tokens(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric() && c != '\'')
        .filter(|t| !t.is_empty())
        .map(|t| t.replace('\'', "").to_lowercase())
        .collect()
}

/// Tokens are what lowercasing each word with `str::to_lowercase` gives (the way they
/// were made before they were lowercased on the stack): ASCII, Unicode, apostrophes, words
/// longer than the stack buffer, Greek final sigma.
#[test]
fn tokens_are_the_lowercased_words() {
    let texts = [
        "Don't BUY it -- it's NOT good, 10/10 wouldn't",
        "' '' x'y 'quoted' Ünïcödé straße ΟΔΟΣ ΣΟΦΟΣ İstanbul",
        "a-very-long-hyphenated-but-split Pneumonoultramicroscopicsilicovolcanoconiosis x",
        "exactly32charactersintothisword1 exactly33charactersintothisword12",
        "",
    ];
    for text in texts {
        assert_eq!(token_list(text), reference_tokens(text), "{text:?}");
    }
}

/// Projecting with the precomputed signs gives the same bits as hashing every entry, for
/// embeddings shorter and longer than the table, with zeros of both signs among the values.
#[test]
fn tabulated_projection_equals_hashing_each_entry() {
    let p = params();
    let reference = |e: &[f32], w: f64| -> [f64; EMBED_DIM] {
        std::array::from_fn(|r| {
            let dot: f64 = e
                .iter()
                .enumerate()
                .map(|(c, x)| projection(p.seed, r, c) * f64::from(*x))
                .sum();
            w * dot
        })
    };
    let mut x = 7u64;
    for len in [0, 1, 3, 32, 257, TABULATED_COLUMNS, TABULATED_COLUMNS + 300] {
        let e: Vec<f32> = (0..len)
            .map(|i| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                match i % 7 {
                    0 => 0.0,
                    1 => -0.0,
                    _ => (x >> 40) as f32 / 1e5 - 80.0,
                }
            })
            .collect();
        let mut state = UserState::default();
        state.add_embedding(&e, 0.75, &p);
        let got = state.embed.map(f64::to_bits);
        let want = reference(&e, 0.75).map(|v| (0.0 + v).to_bits());
        assert_eq!(got, want, "length {len}");
    }
    // All-zero values whose terms are all -0.0 keep the sums' sign as before too.
    let mut state = UserState::default();
    state.add_embedding(&[-0.0; 8], 1.0, &p);
    assert_eq!(
        state.embed.map(f64::to_bits),
        reference(&[-0.0; 8], 1.0).map(|v| (0.0 + v).to_bits())
    );
}

fn view(t: i64, cat: &str) -> Event {
    Event::Click(ClickEvent {
        event_id: format!("v{t}"),
        user_id: "u".into(),
        event_time: t,
        // At most four sessions in the 60 days the property tests span: within the ring.
        session_id: format!("s{}", t / (15 * DAY)),
        kind: ClickKind::View,
        product_id: "p".into(),
        category: cat.into(),
        price: 1.0,
        dwell_ms: 60_000,
        search_text: None,
        embedding: Some(vec![1.0, -0.5, 0.25]),
    })
}

fn order(t: i64, total: f64, status: OrderStatus) -> Event {
    Event::Purchase(PurchaseEvent {
        event_id: format!("o{t}{status:?}"),
        user_id: "u".into(),
        event_time: t,
        order_id: "o".into(),
        status,
        items: vec![LineItem {
            product_id: "p".into(),
            category: "home".into(),
            quantity: 2,
            unit_price: total / 2.0,
            description: Some("RED MUG".into()),
        }],
        total,
        currency: "GBP".into(),
    })
}

fn review(t: i64, rating: i32, text: &str) -> Event {
    Event::Social(SocialEvent {
        event_id: format!("r{t}{text}"),
        user_id: "u".into(),
        event_time: t,
        action: SocialAction::Review,
        target_product: None,
        target_category: Some("books".into()),
        rating: Some(rating),
        text: Some(text.into()),
        embedding: None,
    })
}

fn idx(name: &str) -> usize {
    feature_index(name).unwrap()
}

#[test]
fn names_are_unique_and_cover_the_layout() {
    let mut names: Vec<&str> = (0..DIM).map(feature_name).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), DIM);
    assert_eq!(DIM, 50);
}

#[test]
fn rates_per_day_at_each_half_life() {
    let p = params();
    let mut s = UserState::default();
    // One view a day for 120 days: each half-life's rate tends to 1 per day.
    for d in 0..120 {
        s.apply(&view(d * DAY, "a"), &p);
    }
    let v = s.vector(&p);
    for suffix in ["short", "medium", "long"] {
        let rate = v[idx(&format!("views_per_day_{suffix}"))].exp_m1();
        assert!((0.8..1.6).contains(&rate), "{suffix}: {rate}");
    }
    assert_relative_eq!(v[idx("category_0") + category_bucket("a")], 1.0);
    assert_eq!(s.events, 120);
}

/// The cold-start value: a steady buyer's own rate times the horizon; a single purchase,
/// ln 2 · horizon / half-life of itself; a user who never bought, nothing; an idle one, less.
#[test]
fn the_cold_start_value_is_the_users_own_spend_rate_over_the_horizon() {
    let p = params();
    let horizon = 30 * DAY;
    // 10 a week for a year: about 43 over 30 days.
    let mut steady = UserState::default();
    for w in 0..52 {
        steady.apply(&order(w * 7 * DAY, 10.0, OrderStatus::Placed), &p);
    }
    let v = steady.recent_spend_over(51 * 7 * DAY, horizon, &p);
    assert!((35.0..=55.0).contains(&v), "{v}");
    let mut once = UserState::default();
    once.apply(&order(0, 100.0, OrderStatus::Placed), &p);
    let first = once.recent_spend_over(0, horizon, &p);
    assert_relative_eq!(first, 100.0 * std::f64::consts::LN_2, epsilon = 1e-6);
    assert!(once.recent_spend_over(90 * DAY, horizon, &p) < first / 2.0);
    let mut browser = UserState::default();
    browser.apply(&view(0, "a"), &p);
    assert_eq!(browser.recent_spend_over(0, horizon, &p), 0.0);
}

/// A user sending 100 events a second (a bot, or an id many people share) decays its sums
/// by less than a millionth per event. The sums are `f64` so that such steps are not
/// rounded away: in `f32` (tried, docs/performance.md) this stream's counts come out
/// 0.7 to 2.9 in 10,000 off, and one event a second for two months 0.4 to 2.8 % off.
/// Here every rate matches the closed form to 1e-9.
#[test]
fn rates_of_a_sustained_fast_stream_are_exact() {
    let p = params();
    let mut s = UserState::default();
    let (n, gap) = (50_000, 10);
    for i in 0..n {
        s.apply(&view(i * gap, "a"), &p);
    }
    let v = s.vector(&p);
    for (h, suffix) in ["short", "medium", "long"].into_iter().enumerate() {
        let d = p.decays[h];
        // Σ_{k<n} f^k with f = e^(-gap·rate) = (1 - f^n) / (1 - f), without cancellation.
        let per_gap = -(gap as f64) * d.rate_per_ms;
        let sum = (n as f64 * per_gap).exp_m1() / per_gap.exp_m1();
        let want = d.per_day(sum).ln_1p();
        let got = v[idx(&format!("views_per_day_{suffix}"))];
        assert_relative_eq!(got, want, max_relative = 1e-9);
        let dwell = v[idx(&format!("dwell_minutes_per_day_{suffix}"))];
        assert_relative_eq!(dwell, want, max_relative = 1e-9);
    }
}

#[test]
fn cancellation_reverses_spend_and_sets_the_rate() {
    let p = params();
    let mut s = UserState::default();
    s.apply(&order(0, 100.0, OrderStatus::Placed), &p);
    s.apply(&order(0, 100.0, OrderStatus::Cancelled), &p);
    let v = s.vector(&p);
    assert_relative_eq!(v[idx("monetary")], 0.0, epsilon = 1e-12);
    assert_relative_eq!(v[idx("cancel_rate")], 1.0, epsilon = 1e-12);
    assert_relative_eq!(v[idx("recency_days")], 0.0, epsilon = 1e-12);
}

#[test]
fn ratings_sentiment_and_text() {
    let p = params();
    let mut s = UserState::default();
    s.apply(&review(0, 5, "Love it, great quality"), &p);
    s.apply(&review(0, 2, "not good, arrived damaged"), &p);
    let v = s.vector(&p);
    assert_relative_eq!(v[idx("mean_rating")], 0.5, epsilon = 1e-12);
    // (+1) and (-1 -1): mean of +1 and -1.
    assert_relative_eq!(v[idx("sentiment")], 0.0, epsilon = 1e-12);
    let words: f64 = (0..TEXT_BUCKETS)
        .map(|i| v[idx(&format!("text_{i}"))])
        .sum();
    assert_relative_eq!(words, 1.0, epsilon = 1e-12);
    assert_eq!(sentiment("never late, superb"), Some(1.0));
    assert_eq!(sentiment("a mug"), None);
}

#[test]
fn duplicates_are_recognised_within_the_window() {
    let p = params();
    let mut s = UserState::default();
    let e = view(5, "a");
    assert!(!s.is_duplicate(e.event_id()));
    s.apply(&e, &p);
    assert!(s.is_duplicate(e.event_id()));
    for t in 100..100 + DEDUP_WINDOW as i64 {
        s.apply(&view(t, "a"), &p);
    }
    assert!(!s.is_duplicate(e.event_id()), "the window is bounded");
}

#[test]
fn embeddings_are_projected_and_averaged() {
    let p = params();
    let with = |e: Vec<f32>| {
        let mut s = UserState::default();
        let mut ev = view(0, "a");
        if let Event::Click(c) = &mut ev {
            c.embedding = Some(e);
        }
        s.apply(&ev, &p);
        (0..EMBED_DIM)
            .map(|i| s.vector(&p)[idx(&format!("embedding_{i}"))])
            .collect::<Vec<f64>>()
    };
    let a = with(vec![1.0, 2.0, -1.0, 0.5]);
    let b = with(vec![-1.0, -2.0, 1.0, -0.5]);
    assert!(a.iter().any(|x| x.abs() > 0.1), "{a:?}");
    for (x, y) in a.iter().zip(&b) {
        assert_relative_eq!(*x, -*y, epsilon = 1e-12);
    }
    // Seeded: the same input projects the same way every time.
    assert_eq!(a, with(vec![1.0, 2.0, -1.0, 0.5]));
}

fn arb_event() -> impl Strategy<Value = Event> {
    (0i64..60 * DAY, 0u8..3, 0.0f64..1e6, 1i32..=5).prop_map(|(t, k, amount, r)| match k {
        0 => view(t, "cat"),
        1 => order(t, amount, OrderStatus::Placed),
        _ => review(t, r, "great but slow"),
    })
}

proptest! {
    #[test]
    fn tokens_match_lowercasing_each_word(text in "(\\PC|[ 'A-Za-z]){0,80}") {
        prop_assert_eq!(token_list(&text), reference_tokens(&text));
    }

    #[test]
    fn log_scaling_is_ln_1p(lanes in proptest::array::uniform4(prop_oneof![0.0f64..10.0, 0.0f64..f64::MAX])) {
        assert_ln_1p4_is_ln_1p(lanes);
    }

    #[test]
    fn vectors_are_finite(events in proptest::collection::vec(arb_event(), 1..40)) {
        let p = params();
        let mut s = UserState::default();
        for e in &events {
            s.apply(e, &p);
            prop_assert!(s.vector(&p).iter().all(|x| x.is_finite()));
        }
    }

    #[test]
    fn order_of_arrival_does_not_matter(events in proptest::collection::vec(arb_event(), 1..40), seed in any::<u64>()) {
        use rand::seq::SliceRandom;
        use rand::SeedableRng;
        let p = params();
        let mut sorted = events.clone();
        sorted.sort_by_key(|e| e.event_time());
        let mut shuffled = events;
        shuffled.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
        let (mut a, mut b) = (UserState::default(), UserState::default());
        sorted.iter().for_each(|e| a.apply(e, &p));
        shuffled.iter().for_each(|e| b.apply(e, &p));
        for (i, (x, y)) in a.vector(&p).iter().zip(b.vector(&p)).enumerate() {
            prop_assert!((x - y).abs() <= 1e-9 * (1.0 + x.abs()), "{}: {x} vs {y}", feature_name(i));
        }
    }

    #[test]
    fn decay_is_monotone(dt1 in 0i64..1_000_000_000_000, dt2 in 0i64..1_000_000_000_000) {
        let d = Decay::from_half_life_ms(7.0 * DAY as f64);
        let (lo, hi) = (dt1.min(dt2), dt1.max(dt2));
        prop_assert!(d.factor(hi) <= d.factor(lo));
        prop_assert!(d.factor(lo) <= 1.0 && d.factor(hi) >= 0.0);
    }
}

/// The components' names are a contract: action rules name them (`model.actions`), the
/// catalogue and the API publish centroids by them, and saved models list them. The layout
/// table gives exactly these, in this order.
#[test]
fn the_layout_names_every_component_as_published() {
    let want = [
        "views_per_day_short",
        "searches_per_day_short",
        "cart_adds_per_day_short",
        "checkouts_per_day_short",
        "dwell_minutes_per_day_short",
        "sessions_per_day_short",
        "views_per_day_medium",
        "searches_per_day_medium",
        "cart_adds_per_day_medium",
        "checkouts_per_day_medium",
        "dwell_minutes_per_day_medium",
        "sessions_per_day_medium",
        "views_per_day_long",
        "searches_per_day_long",
        "cart_adds_per_day_long",
        "checkouts_per_day_long",
        "dwell_minutes_per_day_long",
        "sessions_per_day_long",
        "recency_days",
        "frequency",
        "monetary",
        "basket_size",
        "avg_unit_price",
        "cancel_rate",
        "lifetime_orders",
        "tenure_days",
        "category_0",
        "category_1",
        "category_2",
        "category_3",
        "category_4",
        "category_5",
        "category_6",
        "category_7",
        "engagements",
        "reviews",
        "mean_rating",
        "sentiment",
        "text_0",
        "text_1",
        "text_2",
        "text_3",
        "text_4",
        "text_5",
        "text_6",
        "text_7",
        "embedding_0",
        "embedding_1",
        "embedding_2",
        "embedding_3",
    ];
    let names: Vec<&str> = (0..DIM).map(feature_name).collect();
    assert_eq!(names, want);
    assert_eq!(feature_index("monetary"), Some(B_PURCHASE + 2));
    assert_eq!(group_of(B_CATEGORY), Group::Category);
    assert_eq!(group_of(DIM - 1), Group::Embedding);
}

/// Descriptions word rates by their half-life and what the behaviour is, named components by
/// their phrases, categories only above the population, and text and embeddings not at all.
#[test]
fn the_layout_says_how_each_component_is_worded() {
    assert_eq!(words_of(4), Words::Rate(0, "dwell minutes"));
    assert_eq!(words_of(6 + 2), Words::Rate(1, "cart adds"));
    assert_eq!(
        words_of(B_PURCHASE),
        Words::Pick("lapsed buyer", "recent buyer")
    );
    assert_eq!(words_of(B_PURCHASE + 2), Words::Rate(2, "spend"));
    assert_eq!(words_of(B_PURCHASE + 6), Words::Not);
    assert_eq!(words_of(CATEGORY_START + 3), Words::Category);
    assert_eq!(words_of(B_TEXT), Words::Not);
    assert_eq!(words_of(B_EMBED + 3), Words::Not);
}
