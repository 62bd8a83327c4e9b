//! The in-process path per event: decode (Avro, Confluent framing) + validate + fuse features +
//! k-means + SGD + change detection, on pre-generated persona traffic. Criterion prints the
//! throughput in events/s (`thrpt`). Run: `cargo bench --bench pipeline`.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use segstream::config::RawConfig;
use segstream::decode::Decoder;
use segstream::engine::Engine;
use segstream::event::Event;
use segstream::generate::{Generator, Record};
use std::hint::black_box;

const EVENTS: usize = 100_000;
const USERS: usize = 20_000;
const T0: i64 = 1_700_000_000_000;

fn traffic() -> Vec<Record> {
    let settings = RawConfig::default().validate().unwrap();
    let mut g = Generator::new(1, USERS, 0.0);
    (0..EVENTS)
        .map(|i| g.next_record(T0 + i as i64, &settings.decode))
        .collect()
}

fn bench(c: &mut Criterion) {
    let settings = RawConfig::default().validate().unwrap();
    let records = traffic();
    let decoder = Decoder::new(settings.decode.clone());
    let now = T0 + EVENTS as i64;
    let events: Vec<Event> = records
        .iter()
        .map(|r| decoder.decode(r.source, &r.payload, Some(now)).unwrap())
        .collect();
    let new_engine = || {
        let mut e = Engine::new(&settings);
        // Warm: users known and the model seeded, as in a running service.
        for ev in &events {
            e.apply(ev, now);
        }
        e
    };

    let mut g = c.benchmark_group("per_event");
    g.throughput(Throughput::Elements(EVENTS as u64));
    g.sample_size(10);
    g.bench_function("decode_avro", |b| {
        b.iter(|| {
            for r in &records {
                black_box(decoder.decode(r.source, &r.payload, Some(now)).unwrap());
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
                    let ev = decoder.decode(r.source, &r.payload, Some(now)).unwrap();
                    black_box(e.apply(&ev, now));
                }
                e
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
