//! Byte-parallel helpers on 64-bit words (SIMD within a register): the locators compare and
//! classify eight payload bytes per instruction sequence instead of looping over bytes.

pub const ONES: u64 = 0x0101_0101_0101_0101;
pub const HIGH: u64 = 0x8080_8080_8080_8080;
pub const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;

/// A mask of the low `k` bytes of a word (all of it from 8 on).
#[inline(always)]
pub fn low_bytes(k: u64) -> u64 {
    if k == 0 {
        0
    } else if k >= 8 {
        u64::MAX
    } else {
        u64::MAX >> (64 - 8 * k)
    }
}

/// ASCII upper-case letters lowered, every other byte kept.
#[inline(always)]
pub fn lower(x: u64) -> u64 {
    let ge_a = ((x & LOW7) + ONES * (0x80 - b'A' as u64)) & HIGH;
    let gt_z = ((x & LOW7) + ONES * (0x80 - b'Z' as u64 - 1)) & HIGH;
    let upper = ge_a & !gt_z & !x & HIGH;
    x | (upper >> 2)
}
