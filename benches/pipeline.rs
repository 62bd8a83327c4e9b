//! The in-process path per event: decode (Avro, Confluent framing) + validate + fuse features +
//! k-means + SGD + change detection, on pre-generated persona traffic. Criterion prints the
//! throughput in events/s (`thrpt`). Run: `cargo bench --bench pipeline`.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use segstream::bench::apply_records;
use segstream::config::RawConfig;
use segstream::decode::{Decoder, Scratch, ScratchPair};
use segstream::engine::Engine;
use segstream::event::Event;
use segstream::generate::{Generator, Record};
use std::hint::black_box;

const EVENTS: usize = 100_000;
const USERS: usize = 20_000;
const T0: i64 = 1_700_000_000_000;

/// Persona traffic: the first `EVENTS` records warm the engine, the next `EVENTS` are measured
/// (fresh event ids, so none is skipped as a duplicate).
fn traffic() -> (Vec<Record>, Vec<Record>) {
    let settings = RawConfig::default().validate().unwrap();
    let mut g = Generator::new(1, USERS, 0.0);
    let mut all: Vec<Record> = (0..2 * EVENTS)
        .map(|i| g.next_record(T0 + i as i64, &settings.decode))
        .collect();
    let measured = all.split_off(EVENTS);
    (all, measured)
}

fn bench(c: &mut Criterion) {
    let settings = RawConfig::default().validate().unwrap();
    let (warm, records) = traffic();
    let decoder = Decoder::new(settings.decode.clone());
    let now = T0 + 2 * EVENTS as i64;
    let decode_all = |rs: &[Record]| -> Vec<Event> {
        rs.iter()
            .map(|r| decoder.decode(r.source, &r.payload, Some(now)).unwrap())
            .collect()
    };
    let (warm, events) = (decode_all(&warm), decode_all(&records));
    let new_engine = || {
        let mut e = Engine::new(&settings);
        // Warm: users known and the model seeded, as in a running service.
        for ev in &warm {
            e.apply(ev, now);
        }
        e
    };

    // What is measured is real work: every measured event is applied, none skipped.
    let mut check = new_engine();
    assert!(events
        .iter()
        .all(|ev| check.apply(ev, now).outcome == segstream::engine::Outcome::Applied));

    let mut g = c.benchmark_group("per_event");
    g.throughput(Throughput::Elements(EVENTS as u64));
    g.sample_size(10);
    // Decoded as the consume loop does: into reused buffers.
    let mut scratch = Scratch::default();
    g.bench_function("decode_avro", |b| {
        b.iter(|| {
            for r in &records {
                let e = decoder.decode_in(r.source, &r.payload, Some(now), &mut scratch);
                black_box(e.unwrap());
            }
        })
    });
    g.bench_function("engine_apply", |b| {
        b.iter_batched(
            new_engine,
            |mut e| {
                for ev in &events {
                    black_box(e.apply(ev, now));
                }
                e
            },
            BatchSize::LargeInput,
        )
    });
    g.bench_function("decode_and_apply", |b| {
        b.iter_batched(
            new_engine,
            |mut e| {
                for r in &records {
                    let ev = decoder.decode_in(r.source, &r.payload, Some(now), &mut scratch);
                    black_box(e.apply(ev.unwrap(), now));
                }
                e
            },
            BatchSize::LargeInput,
        )
    });
    // As the consume loop does it: the next message decoded before the current one is applied,
    // its user's state prefetched.
    let mut pair = ScratchPair::default();
    g.bench_function("decode_ahead_and_apply", |b| {
        b.iter_batched(
            new_engine,
            |mut e| {
                let decoded = apply_records(&decoder, &mut e, &mut pair, &records, now);
                assert_eq!(decoded, EVENTS);
                e
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
