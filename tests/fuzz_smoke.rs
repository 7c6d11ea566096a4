//! The CI smoke run of the fuzz targets (`fuzz/`, see `TESTING.md`): each
//! target's entry point in `heartgate::fuzzing` on its seed corpus and on
//! deterministic mutations of it (byte flips, insertions, deletions,
//! duplications, JSON tokens, splices). A panic is a finding: the failing
//! input is printed as a Rust byte string. `HEARTGATE_FUZZ_ITERS` sets the
//! mutations per target (default 100000).

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

use std::path::Path;

/// Tokens worth inserting into JSON.
const DICTIONARY: &[&[u8]] = &[
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"",
    b":",
    b",",
    b"null",
    b"true",
    b"false",
    b"-1",
    b"0",
    b"1e999",
    b"-1e999",
    b"NaN",
    b"Infinity",
    b"9223372036854775808",
    b"-9223372036854775809",
    b"0.5",
    b"\"\\u0000\"",
    b"\"\\ud800\"",
    b"\xff\xfe",
    b"\"platform\"",
    b"\"workspace\"",
    b"\"poll\"",
    b"\"push\"",
    b"\"workspace_id\"",
    b"\"id\"",
    b"\"agent_card\"",
    b"\"error_rate\"",
    b"\"active_tasks\"",
    b"\"mcp_server_present\"",
    b"\"kind\"",
    b"\"set_status\"",
    b"\"reject\"",
    b"\"set_marker\"",
    b"\"record_event\"",
    b"\"request_reconcile\"",
    b"\"mcp-recovery\"",
    b"\"online\"",
    b"\"failed\"",
    b"\"removed\"",
    b"\"expected\"",
    b"\"to\"",
    b"\"owner\"",
    b"\"http_status\"",
    b"600",
];

/// xorshift64*: a small deterministic generator, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % (n.max(1) as u64)).unwrap_or(0)
    }
}

fn mutate(rng: &mut Rng, seeds: &[Vec<u8>], mut data: Vec<u8>) -> Vec<u8> {
    for _ in 0..=rng.below(8) {
        let at = rng.below(data.len() + 1);
        match rng.below(6) {
            0 if !data.is_empty() => {
                let i = rng.below(data.len());
                data[i] ^= 1 << rng.below(8);
            }
            1 => data.insert(at, (rng.next() & 0xff) as u8),
            2 if !data.is_empty() => {
                let end = (at + rng.below(16)).min(data.len());
                data.drain(at.min(end)..end);
            }
            3 if !data.is_empty() => {
                let start = rng.below(data.len());
                let end = (start + rng.below(64)).min(data.len());
                let chunk = data[start..end].to_vec();
                data.splice(at..at, chunk);
            }
            4 => {
                let token = DICTIONARY[rng.below(DICTIONARY.len())];
                data.splice(at..at, token.iter().copied());
            }
            _ => {
                let other = &seeds[rng.below(seeds.len())];
                let from = rng.below(other.len());
                data.truncate(at);
                data.extend_from_slice(&other[from..]);
            }
        }
    }
    data
}

fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let seeds: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
    seeds
}

/// Run `target` on its seeds and their mutations; returns the executions.
fn smoke(name: &str, target: fn(&[u8])) -> usize {
    let iterations: usize = std::env::var("HEARTGATE_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let seeds = seeds(name);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ name.len() as u64);
    let mut runs = 0;
    let mut run = |data: &[u8]| {
        let caught = std::panic::catch_unwind(|| target(data));
        assert!(
            caught.is_ok(),
            "{name}: found a failing input: b{:?}",
            String::from_utf8_lossy(data)
        );
        runs += 1;
    };
    for seed in &seeds {
        run(seed);
    }
    for _ in 0..iterations {
        let base = seeds[rng.below(seeds.len())].clone();
        let data = mutate(&mut rng, &seeds, base);
        run(&data);
    }
    println!("{name}: {runs} executions, no failure");
    runs
}

#[test]
fn fuzz_smoke_heartbeat_body() {
    assert!(smoke("heartbeat_body", heartgate::fuzzing::heartbeat_body) > 1000);
}

#[test]
fn fuzz_smoke_register_body() {
    assert!(smoke("register_body", heartgate::fuzzing::register_body) > 1000);
}

#[test]
fn fuzz_smoke_actions() {
    assert!(smoke("actions", heartgate::fuzzing::actions) > 1000);
}
