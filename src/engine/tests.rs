use super::assignment::user_action;
use super::*;
use crate::config::RawConfig;
use crate::event::{ClickEvent, ClickKind};
use crate::features::{action_tag_hash, DIM, LAYOUT_VERSION};
use crate::generate::Generator;

const T0: i64 = 1_700_000_000_000;

#[test]
fn a_model_alone_knows_each_segments_share_of_the_population() {
    let mut e = Engine::new(&RawConfig::default().validate().unwrap());
    assert!(e.segment_shares().iter().all(|s| *s == 0.0));
    let mut g = Generator::new(5, 500, 0.0);
    for i in 0..8_000 {
        let t = T0 + i * 100;
        e.apply(&g.next_event(t), t);
    }
    let shares = e.segment_shares();
    assert_eq!(shares.len(), 6);
    assert!(
        (shares.iter().sum::<f64>() - 1.0).abs() < 1e-9,
        "{shares:?}"
    );
    assert!(
        shares.iter().all(|s| *s > 0.02),
        "every persona has weight: {shares:?}"
    );
}

#[test]
fn before_any_label_matures_value_and_propensity_are_the_users_own_rates_and_say_so() {
    let mut e = Engine::new(&RawConfig::default().validate().unwrap());
    let order = Event::Purchase(crate::event::PurchaseEvent {
        event_id: "o1".into(),
        user_id: "buyer".into(),
        event_time: T0,
        order_id: "o1".into(),
        status: crate::event::OrderStatus::Placed,
        items: vec![crate::event::LineItem {
            product_id: "p".into(),
            category: "home".into(),
            quantity: 1,
            unit_price: 80.0,
            description: None,
        }],
        total: 80.0,
        currency: "GBP".into(),
    });
    e.apply(&order, T0);
    e.apply(&click("c1", "browser", T0), T0);
    assert_eq!(e.value_source(), "cold_start");
    let value = e.user("buyer").unwrap().predicted_value;
    // ln 2 · 30 days / the 30-day long half-life of the order.
    assert!((50.0..=60.0).contains(&value), "{value}");
    assert_eq!(e.user("browser").unwrap().predicted_value, 0.0);
    // Propensity from the same rate: ln 2 expected orders in 30 days, 1 − e^(−ln 2) = ½.
    let p = e.user("buyer").unwrap().signals.purchase_probability;
    assert!((0.49..=0.51).contains(&p), "{p}");
    let browser = e.user("browser").unwrap().signals.purchase_probability;
    assert_eq!(browser, 0.0);
}

fn order(id: &str, user: &str, t: i64, total: f64, status: crate::event::OrderStatus) -> Event {
    Event::Purchase(crate::event::PurchaseEvent {
        event_id: id.into(),
        user_id: user.into(),
        event_time: t,
        order_id: "o".into(),
        status,
        items: vec![crate::event::LineItem {
            product_id: "p".into(),
            category: "home".into(),
            quantity: 1,
            unit_price: total,
            description: None,
        }],
        total,
        currency: "GBP".into(),
    })
}

#[test]
fn a_value_tier_is_entered_at_its_minimum_and_left_below_it_by_the_hysteresis() {
    let rules: Vec<SegmentAction> = vec![(Some(100.0), "vip".into()), (None, "nurture".into())];
    let table = [rules];
    let mut s = UserState::default();
    let at = |s: &UserState| user_action(&table, 0, s, 0.1);
    s.predicted_value = 99.0;
    assert_eq!(at(&s), Some("nurture"));
    s.predicted_value = 100.0;
    assert_eq!(at(&s), Some("vip"));
    s.signals.published_action = action_tag_hash(Some("vip"));
    s.predicted_value = 91.0;
    assert_eq!(at(&s), Some("vip"), "kept within 10 % below the minimum");
    s.predicted_value = 89.0;
    assert_eq!(at(&s), Some("nurture"));
    assert_eq!(user_action(&table, 5, &s, 0.1), None, "no such segment");
}

/// A new user of a trained engine (cold-start values: the user's own spend rate) orders,
/// browses, is refunded, browses; with one action rule, `vip` from a value of 10. Returns
/// the engine and the user's records.
fn vip_for_a_while(updates: bool) -> (Engine, Vec<SegmentChange>) {
    use crate::event::OrderStatus::{Placed, Refunded};
    let mut raw = RawConfig::default();
    let rule = |tag: &str, min| crate::config::ActionRule {
        tag: tag.into(),
        feature: None,
        min_z: None,
        max_z: None,
        min_user_value: min,
    };
    raw.model.actions = vec![rule("vip", Some(10.0))];
    // Moves need the user 10× nearer another segment: this user stays where they are.
    raw.model.hysteresis = 0.9;
    raw.model.min_dwell_events = 3;
    raw.model.min_dwell = std::time::Duration::from_secs(30 * 86_400);
    raw.output.updates = updates;
    let (mut e, _) = trained(raw, 20_000);
    assert_eq!(
        e.value_source(),
        "cold_start",
        "values are the user's own spend rate"
    );
    let mut t = T0 + 20_000 * 1_000;
    let mut records = Vec::new();
    let mut send = |e: &mut Engine, event: &dyn Fn(i64) -> Event| {
        t += 1_000;
        let applied = e.apply(&event(t), t);
        records.extend(
            applied
                .changes
                .into_iter()
                .filter(|c| c.user_id == "newbie"),
        );
    };
    send(&mut e, &|t| click("n1", "newbie", t));
    send(&mut e, &|t| order("n2", "newbie", t, 100.0, Placed));
    for i in 0..10 {
        send(&mut e, &|t| click(&format!("n3-{i}"), "newbie", t));
    }
    send(&mut e, &|t| order("n4", "newbie", t, 100.0, Refunded));
    for i in 0..10 {
        send(&mut e, &|t| click(&format!("n5-{i}"), "newbie", t));
    }
    (e, records)
}

#[test]
fn an_action_change_without_a_move_publishes_one_updated_record_per_dwell() {
    let (e, records) = vip_for_a_while(true);
    let reasons: Vec<_> = records
        .iter()
        .map(|c| (c.reason, c.action.as_deref()))
        .collect();
    assert_eq!(
        reasons,
        [
            (ChangeReason::FirstAssignment, None),
            (ChangeReason::Updated, Some("vip")),
            (ChangeReason::Updated, None),
        ],
        "{records:#?}"
    );
    let (first, vip, lapsed) = (&records[0], &records[1], &records[2]);
    assert_eq!(vip.previous_segment, Some(first.new_segment));
    assert_eq!(vip.new_segment, first.new_segment);
    assert!(first.version < vip.version && vip.version < lapsed.version);
    // Published at the third event after the first record (the dwell), not at the order.
    assert_eq!(vip.event_time - first.event_time, 3_000);
    assert!(vip.predicted_value >= 10.0 && lapsed.predicted_value < 9.0);
    assert_eq!(
        e.user("newbie").unwrap().segment,
        Some(first.new_segment as u32)
    );
}

#[test]
fn with_updates_off_only_moves_are_published() {
    let (_, records) = vip_for_a_while(false);
    let reasons: Vec<_> = records.iter().map(|c| c.reason).collect();
    assert_eq!(reasons, [ChangeReason::FirstAssignment]);
}

fn click(id: &str, user: &str, t: i64) -> Event {
    Event::Click(ClickEvent {
        event_id: id.into(),
        user_id: user.into(),
        event_time: t,
        session_id: "s".into(),
        kind: ClickKind::View,
        product_id: "p".into(),
        category: "home".into(),
        price: 1.0,
        dwell_ms: 1000,
        search_text: None,
        embedding: None,
    })
}

/// Persona traffic through an engine: (engine, generator).
fn trained(raw: RawConfig, events: usize) -> (Engine, Generator) {
    let mut e = Engine::new(&raw.validate().unwrap());
    let mut g = Generator::new(3, 600, 0.0);
    let mut t = T0;
    for _ in 0..events {
        t += 1_000;
        e.apply(&g.next_event(t), t);
    }
    (e, g)
}

/// The consume loop's order (decode the next message, prefetch its user, then apply the
/// current one) gives the same outcomes, changes, states and models as one message at a
/// time: prefetching only warms caches (it creates no user, even for one not seen yet).
#[test]
fn prefetching_the_next_user_changes_nothing() {
    let settings = RawConfig::default().validate().unwrap();
    let d = crate::decode::Decoder::new(settings.decode.clone());
    let mut g = Generator::new(8, 300, 0.05);
    let records: Vec<_> = (0..6_000)
        .map(|i| g.next_record(T0 + i * 1_000, &settings.decode))
        .collect();
    let now = T0 + 10_000_000;
    let (mut plain, mut ahead_engine) = (Engine::new(&settings), Engine::new(&settings));
    let mut pair = crate::decode::ScratchPair::default();
    let mut ahead = None;
    let mut prefetched_new = 0;
    for (i, r) in records.iter().enumerate() {
        let expected = d
            .decode(r.source, &r.payload, Some(now))
            .map(|e| plain.apply(&e, now));
        let got = match pair.decode(&d, r.source, &r.payload, Some(now), ahead.take()) {
            Ok((event, spare)) => {
                if let Some(n) = records.get(i + 1) {
                    let (token, user) = spare.decode(&d, n.source, &n.payload, Some(now));
                    if let Some(user) = user {
                        let known = ahead_engine.user(user).is_some();
                        ahead_engine.prefetch(user);
                        assert_eq!(ahead_engine.user(user).is_some(), known);
                        prefetched_new += usize::from(!known);
                    }
                    ahead = Some(token);
                }
                Ok(ahead_engine.apply(event, now))
            }
            Err(e) => Err(e),
        };
        match (expected, got) {
            (Ok(a), Ok(b)) => {
                assert_eq!(a.outcome, b.outcome, "record {i}");
                assert_eq!(a.changes, b.changes, "record {i}");
            }
            (a, b) => assert_eq!(a.err(), b.err(), "record {i}"),
        }
    }
    assert!(prefetched_new > 100, "{prefetched_new}");
    assert_eq!(plain.store.snapshot(), ahead_engine.store.snapshot());
    // As JSON values: the category names are maps in per-process hash order.
    let models =
        |e: &Engine| -> serde_json::Value { serde_json::from_slice(&e.export_models()).unwrap() };
    assert!(models(&plain) == models(&ahead_engine), "the models differ");
}

#[test]
fn duplicates_are_ignored_and_late_events_follow_the_policy() {
    let mut raw = RawConfig::default();
    raw.features.late_policy = LatePolicy::DeadLetter;
    let mut e = Engine::new(&raw.validate().unwrap());
    assert_eq!(e.apply(&click("a", "u", T0), 0).outcome, Outcome::Applied);
    assert_eq!(e.apply(&click("a", "u", T0), 0).outcome, Outcome::Duplicate);
    let later = T0 + 3 * 3_600_000;
    assert_eq!(
        e.apply(&click("b", "u", later), 0).outcome,
        Outcome::Applied
    );
    // 3 h older than the user's latest event, the allowed lateness is 1 h.
    assert_eq!(
        e.apply(&click("c", "u", T0), 0).outcome,
        Outcome::Late { applied: false }
    );
    assert_eq!(e.user("u").unwrap().events, 2);
    let c = e.counters();
    assert_eq!((c.applied, c.duplicates, c.late), (2, 1, 1));

    let mut e = Engine::new(&RawConfig::default().validate().unwrap());
    e.apply(&click("b", "u", later), 0);
    assert_eq!(
        e.apply(&click("c", "u", T0), 0).outcome,
        Outcome::Late { applied: true }
    );
    assert_eq!(e.user("u").unwrap().events, 2);
}

#[test]
fn value_model_ranks_big_spenders_first() {
    let mut raw = RawConfig::default();
    raw.model.value_horizon = std::time::Duration::from_secs(3_600);
    raw.model.sweep_interval = std::time::Duration::from_secs(600);
    let (e, g) = trained(raw, 60_000);
    let (_, _, labels) = e.value_errors();
    assert!(labels > 1_000, "labels matured: {labels}");
    let mut by_persona: HashMap<usize, (f64, f64)> = HashMap::new();
    for u in e.dump() {
        let p = g.persona_of(&u.user_id).unwrap();
        let entry = by_persona.entry(p).or_default();
        entry.0 += u.predicted_value;
        entry.1 += 1.0;
    }
    let mean = |p: usize| by_persona[&p].0 / by_persona[&p].1;
    let big = (0..g.personas().len())
        .find(|&p| g.personas()[p].name == "big_spender")
        .unwrap();
    for p in 0..g.personas().len() {
        if p != big {
            assert!(
                mean(big) > 2.0 * mean(p),
                "big spenders {:.1} vs {} {:.1}",
                mean(big),
                g.personas()[p].name,
                mean(p)
            );
        }
    }
}

#[test]
fn segments_are_described_and_tagged() {
    let mut raw = RawConfig::default();
    raw.model.value_horizon = std::time::Duration::from_secs(3_600);
    let (e, _) = trained(raw, 40_000);
    let segments = e.segments();
    assert!(segments.iter().all(|s| !s.label.is_empty() && s.size > 0));
    let spenders = segments
        .iter()
        .max_by(|a, b| a.mean_predicted_value.total_cmp(&b.mean_predicted_value))
        .unwrap();
    assert!(
        spenders.label.contains("spend") || spenders.label.contains("frequent buyer"),
        "{spenders:?}"
    );
    // The default rules tag frequent buyers with a cross-sell of their top category.
    assert!(
        segments.iter().any(|s| s
            .action
            .as_deref()
            .is_some_and(|a| a.starts_with("cross_sell:"))),
        "{segments:?}"
    );
}

#[test]
fn a_cross_sell_needs_a_category_the_segments_members_stand_out_on() {
    // The same personas, but every click and line item in one category: no segment has a
    // category of its own, so no cross-sell can name one (it used to name a hash bucket).
    let mut e = Engine::new(&RawConfig::default().validate().unwrap());
    let mut g = Generator::new(3, 600, 0.0);
    let mut t = T0;
    for _ in 0..40_000 {
        t += 1_000;
        let mut ev = g.next_event(t);
        match &mut ev {
            Event::Click(c) => c.category = "everything".into(),
            Event::Purchase(p) => p
                .items
                .iter_mut()
                .for_each(|i| i.category = "everything".into()),
            Event::Social(s) => {
                if s.target_category.is_some() {
                    s.target_category = Some("everything".into());
                }
            }
        }
        e.apply(&ev, t);
    }
    let segments = e.segments();
    assert!(
        segments.iter().all(|s| !s
            .action
            .as_deref()
            .is_some_and(|a| a.starts_with("cross_sell:"))),
        "{segments:?}"
    );
    // With the personas' own categories a cross-sell names a category with real affinity.
    let (e, _) = trained(RawConfig::default(), 40_000);
    for s in e.segments() {
        if let Some(cat) = s
            .action
            .as_deref()
            .and_then(|a| a.strip_prefix("cross_sell:"))
        {
            assert!(!cat.starts_with("category group"), "{s:?}");
            assert_eq!(e.top_category(s.id as usize).as_deref(), Some(cat));
        }
    }
}

#[test]
fn the_catalogue_creates_every_segment_and_changes_carry_its_wording_and_version() {
    use crate::catalogue::CatalogueReason;
    let mut e = Engine::new(&RawConfig::default().validate().unwrap());
    let mut g = Generator::new(3, 600, 0.0);
    let (mut t, mut changes, mut catalogue) = (T0, Vec::new(), Vec::new());
    for _ in 0..40_000 {
        t += 1_000;
        changes.extend(e.apply(&g.next_event(t), t).changes);
        catalogue.extend(e.take_catalogue());
    }
    let created: Vec<i32> = catalogue
        .iter()
        .filter(|r| r.reason == CatalogueReason::Created)
        .map(|r| r.segment_id)
        .collect();
    assert_eq!(created, (0..6).collect::<Vec<_>>(), "{catalogue:#?}");
    assert!(catalogue
        .windows(2)
        .all(|w| w[0].catalogue_version < w[1].catalogue_version));
    assert!(catalogue.iter().all(|r| r.centroid.len() == DIM));
    // Every change names the wording its catalogue version gave its segment.
    for c in changes.iter().filter(|c| c.reason != ChangeReason::Erased) {
        let wording = catalogue
            .iter()
            .filter(|r| r.segment_id == c.new_segment && r.catalogue_version <= c.catalogue_version)
            .max_by_key(|r| r.catalogue_version)
            .unwrap_or_else(|| panic!("no catalogue record before {c:?}"));
        assert_eq!(wording.label, c.segment_label, "{c:?}");
    }
    let last = catalogue.last().unwrap().catalogue_version;
    assert!(changes
        .iter()
        .all(|c| (1..=last).contains(&c.catalogue_version)));
}

#[test]
fn saved_models_keep_their_ids_and_other_layouts_are_refused() {
    let (e, g) = trained(RawConfig::default(), 20_000);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.json");
    e.save_model(&path).unwrap();
    let settings = RawConfig::default().validate().unwrap();
    let loaded = Engine::with_model(&settings, &path).unwrap();
    assert_eq!(loaded.model_version(), e.model_version());
    for (_, _, z) in e.assigned_vectors().iter().take(200) {
        assert_eq!(
            loaded.global.models.kmeans.nearest(z).map(|n| n.best),
            e.global.models.kmeans.nearest(z).map(|n| n.best)
        );
    }
    // As of the saved model (the cached wording may lag it by a few mini-batches).
    for j in 0..e.global.models.kmeans.k() {
        assert_eq!(loaded.describe(j), e.describe_now(j));
    }
    let _ = g;

    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    json["layout_version"] = serde_json::json!(LAYOUT_VERSION + 1);
    std::fs::write(&path, json.to_string()).unwrap();
    assert!(matches!(
        Engine::with_model(&settings, &path),
        Err(ModelError::Layout { .. })
    ));
    let mut raw = RawConfig::default();
    raw.model.k = 8;
    json["layout_version"] = serde_json::json!(LAYOUT_VERSION);
    std::fs::write(&path, json.to_string()).unwrap();
    assert!(matches!(
        Engine::with_model(&raw.validate().unwrap(), &path),
        Err(ModelError::K { got: 6, want: 8 })
    ));
}

/// Applies a checkpoint's records the way the changelog restorer does.
fn replay_records(into: &mut HashMap<String, UserState>, records: &HashMap<i32, Vec<UserRecord>>) {
    for recs in records.values() {
        for (id, v) in recs {
            match v {
                Some(s) => {
                    let bytes = crate::changelog::encode_user(s);
                    into.insert(
                        id.as_str().to_owned(),
                        *crate::changelog::decode_user(&bytes).unwrap(),
                    );
                }
                None => {
                    into.remove(id.as_str());
                }
            }
        }
    }
}

#[test]
fn checkpoints_carry_changes_and_removals_and_restore_the_same_state() {
    let s = RawConfig::default().validate().unwrap();
    let mut e = Engine::new(&s);
    let mut g = Generator::new(5, 300, 0.0);
    let mut t = T0;
    let mut log = HashMap::new();
    for round in 0..4 {
        for _ in 0..3_000 {
            t += 1_000;
            let ev = g.next_event(t);
            let shard = (ev.user_id().len() % 3) as i32;
            e.apply_in(&ev, t, shard);
        }
        if round == 2 {
            let some = e.store.sorted_ids()[0].clone();
            assert!(e.erase(some.as_str(), t).is_some());
        }
        let full: &[i32] = if round == 0 { &[0, 1, 2] } else { &[] };
        let records = e.checkpoint(full);
        replay_records(&mut log, &records);
    }
    assert_eq!(log.len(), e.users());
    for (id, state) in e.store.snapshot() {
        assert_eq!(log.get(id.as_str()), Some(&state));
    }
    // Nothing changed: the next delta is empty; one event: one record.
    assert!(e.checkpoint(&[]).values().all(Vec::is_empty));
    let one = e.store.sorted_ids()[1].clone();
    e.apply_in(&click("one-more", one.as_str(), t), t, 7);
    let delta = e.checkpoint(&[]);
    assert_eq!(delta.len(), 1);
    assert_eq!(delta[&7].len(), 1);
    assert_eq!(delta[&7][0].0, one);
    replay_records(&mut log, &delta);

    // A second engine restored from the log and the global state agrees, segment sizes too.
    let mut r = Engine::new(&s);
    r.restore_global(&e.export_global()).unwrap();
    for shard in 0..3 {
        let users = e
            .store
            .snapshot()
            .into_iter()
            .filter(|(id, _)| (id.as_str().len() % 3) as i32 == shard)
            .map(|(id, s)| (id, Box::new(s)))
            .collect();
        r.restore_shard(shard, users);
    }
    let sizes = |e: &Engine| {
        e.segment_figures()
            .iter()
            .map(|f| f.size)
            .collect::<Vec<_>>()
    };
    assert_eq!(sizes(&r), sizes(&e));
    assert_eq!(r.model_version(), e.model_version());
    assert_eq!(r.applied(), e.applied());
    let released = r.release_shard(1);
    assert!(released > 0);
    assert_eq!(r.users(), e.users() - released);
    let sized: i64 = r.segment_figures().iter().map(|f| f.size).sum();
    assert_eq!(sized as usize, r.users());
}

#[test]
fn max_users_evicts_the_least_recently_seen_and_says_so() {
    let mut raw = RawConfig::default();
    raw.state.max_users = 100;
    let mut e = Engine::new(&raw.validate().unwrap());
    let mut evicted = Vec::new();
    for i in 0..1_000 {
        let t = T0 + i * 1_000;
        let a = e.apply(&click(&format!("e{i}"), &format!("u{i:04}"), t), t);
        evicted.extend(
            a.changes
                .into_iter()
                .filter(|c| c.reason == ChangeReason::Evicted),
        );
        assert!(e.users() <= 101, "max_users plus the 1 % slack");
    }
    assert_eq!(evicted.len(), 1_000 - e.users());
    assert_eq!(e.counters().evicted, evicted.len() as u64);
    // The oldest went first; the newest are kept.
    assert_eq!(evicted[0].user_id, "u0000");
    assert!(e.user("u0999").is_some());
    let removed: usize = e
        .checkpoint(&[])
        .values()
        .flatten()
        .filter(|r| r.1.is_none())
        .count();
    assert_eq!(removed, evicted.len());
}

#[test]
fn idle_users_are_evicted_after_the_ttl() {
    let mut raw = RawConfig::default();
    raw.state.ttl = std::time::Duration::from_secs(86_400);
    let mut e = Engine::new(&raw.validate().unwrap());
    e.apply(&click("a", "idle", T0), T0);
    let mut t = T0;
    let mut evicted = Vec::new();
    for i in 0..100 {
        t += 1_800_000; // half an hour
        let a = e.apply(&click(&format!("b{i}"), "busy", t), t);
        evicted.extend(
            a.changes
                .into_iter()
                .filter(|c| c.reason == ChangeReason::Evicted),
        );
    }
    assert_eq!(evicted.len(), 1);
    assert_eq!(evicted[0].user_id, "idle");
    assert!(e.user("idle").is_none() && e.user("busy").is_some());
}

#[test]
fn a_user_seen_again_after_erasure_gets_higher_versions() {
    let mut raw = RawConfig::default();
    raw.model.init_users = 10;
    raw.model.init_events = 100;
    let mut e = Engine::new(&raw.validate().unwrap());
    let mut t = T0;
    let mut last = 0;
    for i in 0..500 {
        t += 60_000;
        for c in e
            .apply(&click(&format!("a{i}"), &format!("u{}", i % 50), t), t)
            .changes
        {
            if c.user_id == "u7" {
                assert!(c.version > last);
                last = c.version;
            }
        }
    }
    assert!(last > 0, "u7 was assigned");
    let erased = e.erase("u7", t).unwrap();
    assert!(erased.version > last);
    t += 60_000;
    e.apply(&click("again", "u7", t), t);
    assert!(e.user("u7").unwrap().version > erased.version);
}
