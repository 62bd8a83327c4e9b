//! Micro-benchmarks of the pure core's parts, per operation: decoding per input topic, feature
//! fusion (apply an event to a user's state, then build its 50-component vector), a k-means step
//! (nearest centroid + mini-batch learn), an SGD step (predict + train), and a known user's event
//! through the whole engine, which includes change detection on the event's path; change
//! detection without an event (the engine's sweep, which re-decides every known user's segment
//! at the watermark); and encoding a segment change for the output topic. Run:
//! `cargo bench --bench components`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use segstream::config::RawConfig;
use segstream::decode::{Decoder, Scratch};
use segstream::encode::encode_change;
use segstream::engine::Engine;
use segstream::event::{Event, SegmentChange, Source};
use segstream::features::{FeatureParams, UserState, Vector, DIM};
use segstream::generate::{Generator, Record};
use segstream::model::{KMeans, Sgd};
use std::hint::black_box;

const N: usize = 20_000;
const T0: i64 = 1_700_000_000_000;

fn records() -> Vec<Record> {
    let settings = RawConfig::default().validate().unwrap();
    let mut g = Generator::new(1, 2_000, 0.0);
    (0..3 * N)
        .map(|i| g.next_record(T0 + i as i64, &settings.decode))
        .collect()
}

fn bench(c: &mut Criterion) {
    let settings = RawConfig::default().validate().unwrap();
    let decoder = Decoder::new(settings.decode.clone());
    let all = records();
    let now = T0 + 3 * N as i64;
    let mut g = c.benchmark_group("component");
    g.sample_size(10);
    // Decoded as the consume loop does: into reused buffers.
    let mut scratch = Scratch::default();

    for source in Source::ALL {
        let rs: Vec<&Record> = all.iter().filter(|r| r.source == source).collect();
        g.throughput(Throughput::Elements(rs.len() as u64));
        g.bench_function(format!("decode_{}", source.as_str()), |b| {
            b.iter(|| {
                for r in &rs {
                    black_box(
                        decoder
                            .decode_in(r.source, &r.payload, Some(now), &mut scratch)
                            .unwrap(),
                    );
                }
            })
        });
    }

    let events: Vec<Event> = all
        .iter()
        .take(N)
        .map(|r| decoder.decode(r.source, &r.payload, Some(now)).unwrap())
        .collect();
    let params = FeatureParams::new(
        settings.features.half_lives.map(|d| d.as_millis() as f64),
        settings.model.seed,
    );
    // The same events with what persona traffic lacks: a 32-float embedding on every click and
    // social event, as content-aware producers send them; and reviews of 40 words (persona
    // reviews are two words long) and searches of five, as real ones are.
    let with = |change: fn(&mut Event)| -> Vec<Event> {
        let mut changed = events.clone();
        changed.iter_mut().for_each(change);
        changed
    };
    let embedded = with(|e| {
        let embedding = Some((0..32).map(|i| (i as f32 - 16.0) / 8.0).collect());
        match e {
            Event::Click(c) => c.embedding = embedding,
            Event::Social(s) => s.embedding = embedding,
            Event::Purchase(_) => {}
        }
    });
    const REVIEW: &str = "Bought this for my sister's kitchen. It isn't perfect, the lid is a bit \
        flimsy and the box arrived damaged, but the quality is great overall and it works well. \
        Delivery was fast. I would buy it again: excellent value, and the kids love it!";
    let reviewed = with(|e| match e {
        Event::Social(s) => s.text = Some(REVIEW.to_owned()),
        Event::Click(c) if c.search_text.is_some() => {
            c.search_text = Some("Red ceramic Coffee mugs set".to_owned())
        }
        _ => {}
    });
    g.throughput(Throughput::Elements(N as u64));
    for (name, events) in [
        ("feature_fusion", &events),
        ("feature_fusion_embedding32", &embedded),
        ("feature_fusion_reviews", &reviewed),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut state = UserState::default();
                for e in events {
                    state.apply(e, &params);
                    black_box(state.vector(&params));
                }
            })
        });
    }

    // Points like the model sees: standardised persona vectors.
    let mut warm = Engine::new(&settings);
    for e in &events {
        warm.apply(e, now);
    }
    let points: Vec<Vector> = warm
        .dump()
        .into_iter()
        .map(|u| {
            let mut v = [0.0; DIM];
            v.copy_from_slice(&u.model_vector);
            v
        })
        .collect();
    let mut km = KMeans::with_forgetting(6, 42, 400, 64, 7.0 * 86_400_000.0);
    km.fit(&points);
    g.throughput(Throughput::Elements(points.len() as u64));
    g.bench_function("kmeans_step", |b| {
        b.iter(|| {
            for (i, z) in points.iter().enumerate() {
                let n = km.nearest(z).unwrap();
                km.learn(n.best, z, T0 + i as i64);
            }
        })
    });
    let mut sgd = Sgd::new(0.05, 1e-4);
    g.bench_function("sgd_step", |b| {
        b.iter(|| {
            for z in &points {
                let y = black_box(sgd.predict(z));
                sgd.train(z, y * 0.5 + 1.0);
            }
        })
    });

    // A known user's event through the whole engine: state, models and the change decision.
    g.throughput(Throughput::Elements(N as u64));
    let known: Vec<Event> = all
        .iter()
        .skip(N)
        .take(N)
        .map(|r| decoder.decode(r.source, &r.payload, Some(now)).unwrap())
        .collect();
    g.bench_function("engine_apply_known_user", |b| {
        b.iter_batched(
            || {
                let mut e = Engine::new(&settings);
                for ev in &events {
                    e.apply(ev, now);
                }
                e
            },
            |mut e| {
                for ev in &known {
                    black_box(e.apply(ev, now));
                }
            },
            criterion::BatchSize::LargeInput,
        )
    });

    // Change detection per user without an event: the sweep evaluates each of the 2,000 known
    // users at the watermark (decayed vector, standardisation, nearest centroid and distance to
    // the current one, then hysteresis, dwell and flap rules), as it does every `sweep_interval`.
    let mut swept = Engine::new(&settings);
    for ev in events.iter().chain(&known) {
        swept.apply(ev, now);
    }
    g.throughput(Throughput::Elements(swept.users() as u64));
    g.bench_function("change_detection_sweep", |b| {
        b.iter(|| black_box(swept.sweep(now)))
    });

    // Encoding a segment change for the output topic, as the pipeline publishes it: the
    // changes the engine made on these events (first assignments and moves).
    let changes: Vec<SegmentChange> = {
        let mut e = Engine::new(&settings);
        events
            .iter()
            .chain(&known)
            .flat_map(|ev| e.apply(ev, now).changes)
            .collect()
    };
    g.throughput(Throughput::Elements(changes.len() as u64));
    g.bench_function("encode_change", |b| {
        b.iter(|| {
            for c in &changes {
                black_box(encode_change(
                    c,
                    settings.output.format,
                    settings.output.schema_id,
                ));
            }
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
