//! Micro-benchmark: one evaluation of the default chain with a fresh sandbox
//! per policy, against the same rules compiled as native Rust, in one run.
//!
//! `cargo bench --bench evaluation` prints medians and p99s in microseconds.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a benchmark fails loudly"
)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use heartgate::chain::Chain;
use heartgate::engine::Engine;

mod common;

use common::{input as host_input, native_chain};

fn measure(iterations: usize, mut f: impl FnMut()) -> (Duration, Duration) {
    for _ in 0..iterations / 10 {
        f();
    }
    let mut samples: Vec<Duration> = (0..iterations)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    samples.sort();
    (
        samples[samples.len() / 2],
        samples[samples.len() * 99 / 100],
    )
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn main() {
    let engine = Engine::new().unwrap();
    let chain = Chain::builtin(&engine).unwrap();
    let iterations = 5_000;
    println!(
        "heartgate evaluation benchmark ({iterations} iterations each, fresh Store per policy)"
    );

    for (label, present) in [
        ("healthy heartbeat", Some(true)),
        ("mcp-missing heartbeat", Some(false)),
    ] {
        let input = host_input(present);
        let outcome = chain.evaluate(&input);
        assert!(outcome.result.is_ok());
        let (median, p99) = measure(iterations, || {
            black_box(chain.evaluate(black_box(&input)));
        });

        let native_input = heartgate_policy::testing::heartbeat("ws")
            .platform()
            .mcp_present(present);
        let (n_median, n_p99) = measure(iterations, || {
            black_box(native_chain(black_box(&native_input)));
        });
        println!(
            "{label}: chain of {} (wasm, fresh sandbox) median={:.1}us p99={:.1}us | native median={:.2}us p99={:.2}us | ratio={:.0}x",
            chain.slots.len(),
            us(median),
            us(p99),
            us(n_median),
            us(n_p99),
            us(median) / us(n_median).max(0.001),
        );
    }

    let input = host_input(Some(false));
    for slot in &chain.slots {
        let (median, _) = measure(iterations, || {
            black_box(slot.module.evaluate(&input, &[], slot.limits).ok());
        });
        println!("  slot {:<18} median={:.1}us", slot.name, us(median));
    }
}
