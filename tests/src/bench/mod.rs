//! Pieces of `keywall-bench` (tests/src/bin/bench.rs) that stand on their own: raw-instruction
//! XDP programs (drop-all, the live-frames generator), the peers (xdp-filter's object,
//! nftables), the flood rig, and the key-bearing payloads of the other locators.

pub mod flood;
pub mod payloads;
pub mod peers;
pub mod profile;
pub mod rawbpf;
