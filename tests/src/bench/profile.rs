//! What profiling found for issue 11's rows, written into BENCHMARKS.md by every full run (the
//! figures in the tables above it are that run's; these are path differences taken by hand).

pub const ISSUE11: &str = "## Profile notes for issue 11's rows (path differences, 2026-11-30)

No PMU on this VM, so these are path differences: the same frames timed by BPF_PROG_TEST_RUN
(repeat 2,000,000, best of six rounds, one key, small maps) on builds of the program that each
return at one more step, in the same session. They move by 5-10 ns between runs; the
ratios in the tables above are the measured ones.

- **Bare ACK (1.2x target).** 104 ns in all; returning just before the `KW_FLOWS` lookup: 69
  ns. XDP_PASS is 21 ns and xdp-filter's whole pass 65 ns. So parsing (Ethernet, VLAN, IPv4
  or IPv6 with its extension walk, TCP), the live-settings and listener array reads and the
  per-CPU reason counter cost about 48 ns, already xdp-filter's 44 ns above the floor, and the
  flow lookup (40-byte key, jhash over ten words, one value line) with the generation check
  costs about 35 ns. 1.2x leaves 13 ns for the flow state issue 10 needs on every packet.
  Removing the empty tail call of the chaining slot made no measurable difference.
- **64 B data segment (2x target).** 344 ns: up to `position` 124 ns (+13 over the ACK), the
  64-byte scan (the global scan function, pass 1's 32-byte windows, one `bpf_loop` callback
  for the line that starts the segment) +110 ns, and the verdict and flow update (`settle`,
  the retransmission checks, the 80-byte write back, the coarse clock) +110 ns, of which the
  part after the verdict (clock, write back, TLS follow-up check) is about 50 ns. A 2x
  budget is 130 ns for all of it.
- **First key-bearing packet (1.5x / 2.5x targets).** An HTTP request at ISN + 1 costs about
  1,240 ns above the test-run floor; the same request on a judged keep-alive connection 690
  ns. The LRU insert of the new flow is about 200 ns of the difference (measured by skipping
  it); the rest is the `KW_FLOWS` miss, the `KW_HELD` lookup and update, the stream-start check
  and the key's activity record. Per-CPU LRU lists (`BPF_F_NO_COMMON_LRU`) did not change the
  insert's cost here (1.63 vs 1.65 us at 256k flows). A 1.5x budget (about 200 ns at repeat
  1) is less than the insert alone.
- **Prefilter SYN (1.0x target).** 91 ns against 49 for a segment to a port with no
  listener: the listener found, one blocked-Bloom word per prefix length, the drop counter
  and the sampled event's token bucket (about 42 ns). xdp-filter's drop is 57 ns; a 1.0x
  budget is 8 ns above the no-listener path.
- **Floods.** The key-bearing data flood from sources no key allows costs a `KW_FLOWS` miss
  and a `KW_HELD` miss per frame (no SYN was recorded); checking the prefilter first would
  swap the second miss for a Bloom probe, not remove it, and would add the probe to every
  established data segment. The wrong-key flood from an allowed source is the first-packet
  path above.

";
