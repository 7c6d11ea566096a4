//! Criterion benchmarks of the engine: the built-in chain of four with a
//! fresh sandbox per policy, each slot alone, the same rules as native Rust,
//! and loading (compiling) a component. `cargo bench --bench engine`;
//! `cargo bench --bench evaluation` prints the same medians as one summary.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a benchmark fails loudly"
)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};

use heartgate::chain::{BUILTIN, Chain};
use heartgate::engine::Engine;

mod common;

use common::{input, native_chain as native};

fn chain(c: &mut Criterion) {
    let engine = Engine::new().unwrap();
    let chain = Chain::builtin(&engine).unwrap();
    let mut group = c.benchmark_group("chain_of_4");
    for (name, present) in [("healthy", Some(true)), ("mcp_missing", Some(false))] {
        let input = input(present);
        assert!(chain.evaluate(&input).result.is_ok());
        group.bench_function(format!("wasm_fresh_sandbox/{name}"), |b| {
            b.iter(|| chain.evaluate(black_box(&input)))
        });
        let native_input = heartgate_policy::testing::heartbeat("ws")
            .platform()
            .mcp_present(present);
        group.bench_function(format!("native/{name}"), |b| {
            b.iter(|| native(black_box(&native_input)))
        });
    }
    group.finish();

    let input = input(Some(false));
    let mut group = c.benchmark_group("slot");
    for slot in &chain.slots {
        group.bench_function(&slot.name, |b| {
            b.iter(|| slot.module.evaluate(black_box(&input), &[], slot.limits))
        });
    }
    group.finish();
}

fn load(c: &mut Criterion) {
    let engine = Engine::new().unwrap();
    let (_, bytes) = BUILTIN[0];
    let mut group = c.benchmark_group("load");
    group.sample_size(10);
    group.bench_function("compile_and_check_gate", |b| {
        b.iter(|| engine.load(black_box(bytes)).unwrap())
    });
    group.finish();
}

criterion_group!(benches, chain, load);
criterion_main!(benches);
