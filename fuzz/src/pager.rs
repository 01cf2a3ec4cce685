//! The input format of the `pager_calls` target: a configuration byte, then operations on a
//! memory-only pager (issue, forge, replay and corrupt tokens, move the clock, page calls
//! through the doorbell registers or straight to `Pager::serve`, target writes, retire).
//!
//! Each operation is an opcode byte (taken modulo [`OPCODES`]) followed by its fixed-size
//! fields; a field cut short by the end of the input reads as if zero-padded. Addresses and
//! counts are an [`Addr`] or a [`Count`]: a kind byte that picks a region of interest (a page
//! of the window, an unaligned address in it, just below it, near the top of the address
//! space, a raw value, its end) and a `u64` that picks inside it, so that short inputs reach
//! both the valid and the edge cases.

use crate::take_u64s;

/// Pages of the target's RAM.
pub const TARGET_PAGES: u64 = 64;
/// Pages of the appliance's map window.
pub const WINDOW_PAGES: u64 = 32;
/// Pages of the caller's (appliance's) RAM, where tokens are placed.
pub const CALLER_PAGES: u64 = 16;
/// Page size.
pub const PAGE: u64 = 4096;
/// Bytes of a token.
pub const TOKEN: u64 = 32;
/// Token slots in the caller's RAM (slot `k` is at `k * 32`).
pub const TOKEN_SLOTS: u64 = CALLER_PAGES * PAGE / TOKEN;
/// Guest-physical bases the window may have (configuration bit 1).
pub const WINDOW_BASES: [u64; 2] = [0x8000_0000, 0];
/// Lifetime of a token, in the manual clock's milliseconds.
pub const TTL_MS: u64 = 1000;
/// Most operations one input runs.
pub const MAX_OPS: usize = 256;
/// Number of opcodes.
pub const OPCODES: u8 = 13;

/// Every word of target page `page` at write generation `generation` (0 = as filled at the
/// start): the page number, tagged so that page 0 does not read as zero.
pub fn target_word(page: u64, generation: u64) -> u64 {
    0x5047_0000_0000_0000 | (generation << 24) | page
}

/// An address chosen by kind: see [`Addr::resolve`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Addr {
    /// Which region (taken modulo 6).
    pub kind: u8,
    /// Where inside it.
    pub value: u64,
}

impl Addr {
    /// Unit `k` of the region (kind 0): a window or target page, a token slot.
    pub const fn at(k: u64) -> Addr {
        Addr { kind: 0, value: k }
    }

    /// The raw address `gpa` (kind 4).
    pub const fn raw(gpa: u64) -> Addr {
        Addr {
            kind: 4,
            value: gpa,
        }
    }

    /// The address in a region of `units` units of `unit` bytes from `base`:
    /// - 0: unit `value mod (units + 2)` (the two past the end are outside);
    /// - 1: as 0 plus `1 + (value >> 32) mod (unit - 1)` bytes (unaligned, or aligned to less
    ///   than a unit);
    /// - 2: `1 + value mod 4` units below `base` (wrapping below 0);
    /// - 3: `value mod 8` pages below the last page of the address space;
    /// - 4: `value` itself;
    /// - 5: `value mod 64` bytes before the region's end.
    pub fn resolve(self, base: u64, unit: u64, units: u64) -> u64 {
        let v = self.value;
        let at = |k: u64| base.wrapping_add(k.wrapping_mul(unit));
        match self.kind % 6 {
            0 => at(v % (units + 2)),
            1 => at(v % (units + 2)).wrapping_add(1 + (v >> 32) % (unit - 1)),
            2 => base.wrapping_sub(unit * (1 + v % 4)),
            3 => !(PAGE - 1) - (v % 8) * PAGE,
            4 => v,
            _ => at(units).wrapping_sub(v % 64),
        }
    }

    fn read(data: &[u8]) -> (Addr, &[u8]) {
        let kind = data.first().copied().unwrap_or(0);
        let ([value], rest) = take_u64s::<1>(data.get(1..).unwrap_or(&[]));
        (Addr { kind, value }, rest)
    }

    fn write(self, out: &mut Vec<u8>) {
        out.push(self.kind);
        out.extend_from_slice(&self.value.to_le_bytes());
    }
}

/// A page count chosen by kind: see [`Count::resolve`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Count {
    /// Which range (taken modulo 5).
    pub kind: u8,
    /// Where inside it.
    pub value: u64,
}

impl Count {
    /// `n` pages exactly (`n` in 1..=8).
    pub const fn pages(n: u64) -> Count {
        Count {
            kind: 0,
            value: n - 1,
        }
    }

    /// The count:
    /// - 0: `1 + value mod 8`;
    /// - 1: `value mod (WINDOW_PAGES + 2)` (0 and a whole window, and past it);
    /// - 2: 511, 512 or 513 (around `MAX_RANGE_PAGES`);
    /// - 3: `value` itself;
    /// - 4: `value mod 4` below `u64::MAX`.
    pub fn resolve(self) -> u64 {
        let v = self.value;
        match self.kind % 5 {
            0 => 1 + v % 8,
            1 => v % (WINDOW_PAGES + 2),
            2 => 511 + v % 3,
            3 => v,
            _ => u64::MAX - v % 4,
        }
    }

    fn read(data: &[u8]) -> (Count, &[u8]) {
        let (a, rest) = Addr::read(data);
        (
            Count {
                kind: a.kind,
                value: a.value,
            },
            rest,
        )
    }

    fn write(self, out: &mut Vec<u8>) {
        Addr {
            kind: self.kind,
            value: self.value,
        }
        .write(out);
    }
}

/// Which request [`Op::Serve`] hands to `Pager::serve` (kind modulo 8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServeKind {
    /// `Request::MemMap`.
    MemMap = 0,
    /// `Request::MapRange`.
    MapRange = 1,
    /// `Request::MemUnmap`.
    MemUnmap = 2,
    /// `Request::RevokeAll`.
    RevokeAll = 3,
    /// `Request::Version` (not a page call: `InvalidArgument`).
    Version = 4,
    /// `Request::Features` (not a page call).
    Features = 5,
    /// `Request::Notify` (not a page call).
    Notify = 6,
    /// `Request::Agent` (not a page call).
    Agent = 7,
}

impl ServeKind {
    /// The kind named by `byte` (modulo 8).
    pub fn from_byte(byte: u8) -> ServeKind {
        [
            ServeKind::MemMap,
            ServeKind::MapRange,
            ServeKind::MemUnmap,
            ServeKind::RevokeAll,
            ServeKind::Version,
            ServeKind::Features,
            ServeKind::Notify,
            ServeKind::Agent,
        ][usize::from(byte % 8)]
    }
}

/// One operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// 0: issue a token from the target's issuer (or, `other`, from another target's) and
    /// write it to token slot `slot` of the caller's RAM (not written if the issuer refuses).
    Issue {
        /// From the other target's issuer.
        other: bool,
        /// Token slot (modulo [`TOKEN_SLOTS`]).
        slot: u16,
    },
    /// 1: write 32 arbitrary bytes to token slot `slot`.
    Forge {
        /// Token slot.
        slot: u16,
        /// The bytes.
        bytes: [u8; 32],
    },
    /// 2: write token number `which` (modulo how many were issued, used or not) to `slot`.
    Replay {
        /// Token slot.
        slot: u16,
        /// Which issued token.
        which: u8,
    },
    /// 3: flip bit `bit` of the 32 bytes at token slot `slot`.
    Corrupt {
        /// Token slot.
        slot: u16,
        /// Bit 0..=255.
        bit: u8,
    },
    /// 4: advance the issuers' and verifiers' clock by `ms` milliseconds.
    Advance {
        /// Milliseconds.
        ms: u16,
    },
    /// 5: MEM_MAP through the doorbell registers.
    MemMap {
        /// Token address (unit: a token slot).
        token: Addr,
        /// Target page (unit: a target page).
        target: Addr,
        /// Window page (unit: a window page).
        window: Addr,
    },
    /// 6: MAP_RANGE through the doorbell registers.
    MapRange {
        /// Token address.
        token: Addr,
        /// First target page.
        target: Addr,
        /// First window page.
        window: Addr,
        /// Page count.
        pages: Count,
    },
    /// 7: MEM_UNMAP through the doorbell registers.
    MemUnmap {
        /// Window page.
        window: Addr,
    },
    /// 8: REVOKE_ALL through the doorbell registers.
    RevokeAll,
    /// 9: arbitrary doorbell registers. RAX below 256 names `Hypercall::ALL[rax % 8]`, below
    /// 512 is the number `rax - 256`, else itself.
    Raw {
        /// RAX selector.
        rax: u64,
        /// RBX, RCX, RDX, RSI, RDI.
        args: [u64; 5],
    },
    /// 10: a request handed straight to `Pager::serve`, not decoded from registers (so not
    /// checked for alignment, counts or wrapping).
    Serve {
        /// Which request.
        kind: ServeKind,
        /// Token address.
        token: Addr,
        /// Target page.
        target: Addr,
        /// Window page.
        window: Addr,
        /// Page count.
        pages: Count,
    },
    /// 11: the target writes every word of its page `page` (modulo [`TARGET_PAGES`]), to
    /// the next generation ([`target_word`]).
    TargetWrite {
        /// Target page.
        page: u8,
    },
    /// 12: retire the pager (revoke everything, refuse every later map).
    Retire,
}

fn u16_at(data: &[u8]) -> (u16, &[u8]) {
    let mut b = [0u8; 2];
    for (i, x) in b.iter_mut().enumerate() {
        *x = data.get(i).copied().unwrap_or(0);
    }
    (u16::from_le_bytes(b), data.get(2..).unwrap_or(&[]))
}

fn u8_at(data: &[u8]) -> (u8, &[u8]) {
    (
        data.first().copied().unwrap_or(0),
        data.get(1..).unwrap_or(&[]),
    )
}

impl Op {
    fn read(data: &[u8]) -> (Op, &[u8]) {
        let (code, data) = u8_at(data);
        match code % OPCODES {
            0 => {
                let (other, data) = u8_at(data);
                let (slot, data) = u16_at(data);
                (
                    Op::Issue {
                        other: other & 1 == 1,
                        slot,
                    },
                    data,
                )
            }
            1 => {
                let (slot, data) = u16_at(data);
                let (words, data) = take_u64s::<4>(data);
                let mut bytes = [0u8; 32];
                for (chunk, w) in bytes.chunks_exact_mut(8).zip(words) {
                    chunk.copy_from_slice(&w.to_le_bytes());
                }
                (Op::Forge { slot, bytes }, data)
            }
            2 => {
                let (slot, data) = u16_at(data);
                let (which, data) = u8_at(data);
                (Op::Replay { slot, which }, data)
            }
            3 => {
                let (slot, data) = u16_at(data);
                let (bit, data) = u8_at(data);
                (Op::Corrupt { slot, bit }, data)
            }
            4 => {
                let (ms, data) = u16_at(data);
                (Op::Advance { ms }, data)
            }
            5 => {
                let (token, data) = Addr::read(data);
                let (target, data) = Addr::read(data);
                let (window, data) = Addr::read(data);
                (
                    Op::MemMap {
                        token,
                        target,
                        window,
                    },
                    data,
                )
            }
            6 => {
                let (token, data) = Addr::read(data);
                let (target, data) = Addr::read(data);
                let (window, data) = Addr::read(data);
                let (pages, data) = Count::read(data);
                (
                    Op::MapRange {
                        token,
                        target,
                        window,
                        pages,
                    },
                    data,
                )
            }
            7 => {
                let (window, data) = Addr::read(data);
                (Op::MemUnmap { window }, data)
            }
            8 => (Op::RevokeAll, data),
            9 => {
                let ([rax, a, b, c, d, e], data) = take_u64s::<6>(data);
                (
                    Op::Raw {
                        rax,
                        args: [a, b, c, d, e],
                    },
                    data,
                )
            }
            10 => {
                let (kind, data) = u8_at(data);
                let (token, data) = Addr::read(data);
                let (target, data) = Addr::read(data);
                let (window, data) = Addr::read(data);
                let (pages, data) = Count::read(data);
                (
                    Op::Serve {
                        kind: ServeKind::from_byte(kind),
                        token,
                        target,
                        window,
                        pages,
                    },
                    data,
                )
            }
            11 => {
                let (page, data) = u8_at(data);
                (Op::TargetWrite { page }, data)
            }
            _ => (Op::Retire, data),
        }
    }

    fn write(&self, out: &mut Vec<u8>) {
        match *self {
            Op::Issue { other, slot } => {
                out.extend_from_slice(&[0, u8::from(other)]);
                out.extend_from_slice(&slot.to_le_bytes());
            }
            Op::Forge { slot, bytes } => {
                out.push(1);
                out.extend_from_slice(&slot.to_le_bytes());
                out.extend_from_slice(&bytes);
            }
            Op::Replay { slot, which } => {
                out.push(2);
                out.extend_from_slice(&slot.to_le_bytes());
                out.push(which);
            }
            Op::Corrupt { slot, bit } => {
                out.push(3);
                out.extend_from_slice(&slot.to_le_bytes());
                out.push(bit);
            }
            Op::Advance { ms } => {
                out.push(4);
                out.extend_from_slice(&ms.to_le_bytes());
            }
            Op::MemMap {
                token,
                target,
                window,
            } => {
                out.push(5);
                token.write(out);
                target.write(out);
                window.write(out);
            }
            Op::MapRange {
                token,
                target,
                window,
                pages,
            } => {
                out.push(6);
                token.write(out);
                target.write(out);
                window.write(out);
                pages.write(out);
            }
            Op::MemUnmap { window } => {
                out.push(7);
                window.write(out);
            }
            Op::RevokeAll => out.push(8),
            Op::Raw { rax, args } => {
                out.push(9);
                crate::put_u64s(out, &[rax]);
                crate::put_u64s(out, &args);
            }
            Op::Serve {
                kind,
                token,
                target,
                window,
                pages,
            } => {
                out.extend_from_slice(&[10, kind as u8]);
                token.write(out);
                target.write(out);
                window.write(out);
                pages.write(out);
            }
            Op::TargetWrite { page } => out.extend_from_slice(&[11, page]),
            Op::Retire => out.push(12),
        }
    }
}

/// A whole input: configuration and operations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Input {
    /// Bit 0: the window is a copying window (a host agent's memfd, `Pager::new_copying`)
    /// rather than a remapped one. Bit 1: the window's base is `WINDOW_BASES[1]`.
    pub config: u8,
    /// The operations, at most [`MAX_OPS`].
    pub ops: Vec<Op>,
}

impl Input {
    /// Whether the window copies (bit 0 of the configuration).
    pub fn copying(&self) -> bool {
        self.config & 1 == 1
    }

    /// The window's guest-physical base.
    pub fn window_base(&self) -> u64 {
        WINDOW_BASES[usize::from(self.config >> 1 & 1)]
    }

    /// Parses `data` (never fails: any bytes are an input).
    pub fn decode(data: &[u8]) -> Input {
        let (config, mut data) = u8_at(data);
        let mut ops = Vec::new();
        while !data.is_empty() && ops.len() < MAX_OPS {
            let (op, rest) = Op::read(data);
            ops.push(op);
            data = rest;
        }
        Input { config, ops }
    }

    /// The bytes [`Input::decode`] reads back as `self`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![self.config];
        for op in &self.ops {
            op.write(&mut out);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_round_trip() {
        let input = Input {
            config: 3,
            ops: vec![
                Op::Issue {
                    other: true,
                    slot: 7,
                },
                Op::Forge {
                    slot: 1,
                    bytes: [9; 32],
                },
                Op::Replay { slot: 2, which: 3 },
                Op::Corrupt { slot: 2, bit: 200 },
                Op::Advance { ms: 999 },
                Op::MemMap {
                    token: Addr::at(7),
                    target: Addr::at(3),
                    window: Addr::raw(0x8000_0000),
                },
                Op::MapRange {
                    token: Addr::at(7),
                    target: Addr::at(3),
                    window: Addr::at(4),
                    pages: Count::pages(5),
                },
                Op::MemUnmap {
                    window: Addr::at(4),
                },
                Op::RevokeAll,
                Op::Raw {
                    rax: 1,
                    args: [1, 2, 3, 4, 5],
                },
                Op::Serve {
                    kind: ServeKind::MapRange,
                    token: Addr::at(1),
                    target: Addr::at(2),
                    window: Addr::at(3),
                    pages: Count::pages(2),
                },
                Op::TargetWrite { page: 5 },
                Op::Retire,
            ],
        };
        assert_eq!(Input::decode(&input.encode()), input);
        assert_eq!(Count::pages(5).resolve(), 5);
        assert_eq!(Addr::at(3).resolve(0x8000_0000, PAGE, 32), 0x8000_3000);
    }
}
