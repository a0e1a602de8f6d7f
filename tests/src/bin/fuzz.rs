//! `keywall-fuzz`: the differential fuzzer's long campaign (issue 10). Each sequence of
//! segments goes through the compiled XDP program (`BPF_PROG_TEST_RUN`, root) and through the
//! model of a real server; a refused key the server reads from passed segments is a bypass.
//!
//! `cargo xtask fuzz [--sequences N] [--seed S] [--seconds T] [--index I]` runs it in release
//! mode. Exit status 1 when a bypass or a false drop was found.

use std::{process::ExitCode, time::Duration};

use clap::Parser;
use tests::fuzz::run::{Campaign, campaign};

#[derive(Parser)]
#[command(
    name = "keywall-fuzz",
    about = "differential fuzzer: XDP program vs server model"
)]
struct Args {
    /// Sequences to run (default 1,000,000 unless --seconds is given).
    #[arg(long)]
    sequences: Option<u64>,
    /// Stop after this many seconds.
    #[arg(long)]
    seconds: Option<u64>,
    /// Campaign seed (decimal or 0x-hex); sequence i is a function of (seed, i).
    #[arg(long, default_value = "0x6b657977616c6c", value_parser = parse_u64)]
    seed: u64,
    /// Replay only this sequence (printed minimized, with each segment's reason).
    #[arg(long, value_parser = parse_u64)]
    index: Option<u64>,
    /// Print at most this many reproducers (the first of each class).
    #[arg(long, default_value_t = 40)]
    print: usize,
    /// Minimize at most this many failures to classify them.
    #[arg(long, default_value_t = 400)]
    minimize: usize,
}

fn parse_u64(s: &str) -> Result<u64, String> {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    }
    .map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let a = Args::parse();
    let sequences = match (a.sequences, a.seconds) {
        (None, None) => Some(1_000_000),
        (n, _) => n,
    };
    let cfg = Campaign {
        seed: a.seed,
        sequences,
        duration: a.seconds.map(Duration::from_secs),
        print: a.print,
        index: a.index,
        minimize: a.minimize,
    };
    match campaign(&cfg) {
        Ok(rep) => {
            println!("seed {:#x}", a.seed);
            print!("{}", rep.summary());
            if rep.bypasses + rep.false_drops > 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("keywall-fuzz: {e:#}");
            ExitCode::from(2)
        }
    }
}
