//! Segments mean something: on the generator's personas (known ground truth) the streaming
//! segments agree with the personas (adjusted Rand index >= 0.9), and flapping (A -> B -> A
//! within model.flap_window) stays within 1 % of segment changes.

use segstream::config::RawConfig;
use segstream::engine::Engine;
use segstream::generate::Generator;
use segstream::quality::{adjusted_rand_index, flapping_share};
use std::collections::HashMap;

#[test]
fn streaming_segments_recover_the_personas() {
    let settings = RawConfig::default().validate().unwrap();
    let mut engine = Engine::new(&settings);
    let mut g = Generator::new(7, 2_000, 0.0);
    let mut paths: HashMap<String, Vec<u32>> = HashMap::new();
    let (mut t, mut changes) = (1_700_000_000_000i64, 0u64);
    for _ in 0..75_000 {
        t += 200;
        if let Some(c) = engine.apply(&g.next_event(t), t).changes.into_iter().next() {
            changes += 1;
            paths
                .entry(c.user_id)
                .or_default()
                .push(c.new_segment as u32);
        }
    }
    let (mut seg, mut truth) = (Vec::new(), Vec::new());
    for u in engine.dump() {
        seg.push(u.segment.expect("every active user is assigned"));
        truth.push(g.persona_of(&u.user_id).unwrap() as u32);
    }
    let ari = adjusted_rand_index(&seg, &truth);
    let flapping = flapping_share(&paths);
    let flaps = engine.counters().flaps;
    println!("ARI {ari:.3}, changes {changes}, moves flapping {flapping:.4}, engine flaps {flaps}");
    assert!(ari >= 0.9, "adjusted Rand index {ari:.3}");
    assert!(
        (flaps as f64) <= 0.01 * changes as f64,
        "flapping {flaps} of {changes} segment changes"
    );
    assert!(engine.segments().iter().all(|s| s.size > 0));
}
