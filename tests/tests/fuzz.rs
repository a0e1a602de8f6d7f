//! The differential fuzzer's short campaign (issue 10): about a minute of sequences from a
//! fixed seed through the compiled program and the server model. Any bypass (a refused key
//! the model's server reads from segments the program passed) or false drop (a legitimate
//! session's segment not passed) fails the test; so does a campaign too small to mean
//! anything. `cargo xtask fuzz` runs the long campaigns.

use std::time::Duration;

use tests::fuzz::run::{Campaign, campaign};

/// The fixed seed of the in-suite campaign; `cargo xtask fuzz --seed 0x5eed --index I`
/// replays one of its sequences.
const SEED: u64 = 0x5eed;

#[test]
fn differential_campaign() {
    let secs = std::env::var("KEYWALL_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(55);
    let rep = campaign(&Campaign {
        seed: SEED,
        sequences: None,
        duration: Some(Duration::from_secs(secs)),
        print: 12,
        index: None,
        minimize: 150,
    })
    .expect("campaign");
    println!("{}", rep.summary());
    assert!(
        rep.sequences >= 2_000 * secs.clamp(1, 55) / 55,
        "only {} sequences ran",
        rep.sequences
    );
    assert_eq!(
        rep.bypasses + rep.false_drops,
        0,
        "the fuzzer found bypasses or false drops:\n{}",
        rep.summary()
    );
}
