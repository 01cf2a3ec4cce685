//! The check of test-guest's `mode=pattern` area in a memory image: is every page of it as
//! of one instant? (The guest's rules are in `images/test-guest/src/pattern.rs`.)

/// The header's magic word ("pattern1").
pub const MAGIC: u64 = 0x7061_7474_6572_6e31;
const PAGE: usize = 4096;
const WORDS: usize = PAGE / 8;

/// What a consistent area showed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PatternState {
    /// The header's `seq`: the last step the guest finished.
    pub seq: u64,
    /// Data pages.
    pub pages: u64,
    /// Whether step `seq + 1` was half done (its page already written).
    pub in_flight: bool,
}

fn word(page: &[u8], index: usize) -> u64 {
    let at = index * 8;
    u64::from_le_bytes(page[at..at + 8].try_into().expect("8 bytes"))
}

/// The last step `i <= seq` that wrote data page `k` (1-based), or 0.
fn last_write(seq: u64, pages: u64, k: u64) -> u64 {
    let residue = k - 1;
    if seq < residue {
        return 0;
    }
    // 0 when no step wrote the page yet (residue 0 and seq < pages).
    seq - (seq - residue) % pages
}

/// Checks the area at `area` bytes into `image` (`image` holds guest-physical address `0`
/// at offset 0). Errors name the first page that is not as of the header's `seq`.
pub fn check(image: &[u8], area: u64) -> Result<PatternState, String> {
    let area = usize::try_from(area).map_err(|_| "area beyond usize".to_string())?;
    let header = image.get(area..area + PAGE).ok_or_else(|| {
        format!(
            "the area at {area:#x} is beyond the image ({:#x} bytes)",
            image.len()
        )
    })?;
    if word(header, 1) != MAGIC {
        return Err(format!(
            "no pattern magic at {area:#x}: {:#x}",
            word(header, 1)
        ));
    }
    let seq = word(header, 0);
    let pages = word(header, 2);
    let end = area + (pages as usize + 1) * PAGE;
    if pages == 0 || end > image.len() {
        return Err(format!("{pages} data pages do not fit the image"));
    }
    let next_page = 1 + (seq.wrapping_add(1) % pages);
    let mut in_flight = false;
    for k in 1..=pages {
        let page = &image[area + k as usize * PAGE..][..PAGE];
        let (first, last) = (word(page, 0), word(page, WORDS - 1));
        let expected = last_write(seq, pages, k);
        let ok = if k == next_page {
            // Step seq+1 may be under way: word 0 first, then word 511.
            let first_ok = first == expected || first == seq + 1;
            let last_ok = last == expected || (last == seq + 1 && first == seq + 1);
            in_flight = first == seq + 1;
            first_ok && last_ok
        } else {
            first == expected && last == expected
        };
        if !ok {
            return Err(format!(
                "data page {k} holds {first}/{last}, but as of seq {seq} it must hold {expected}"
            ));
        }
    }
    Ok(PatternState {
        seq,
        pages,
        in_flight,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The area after `steps` steps, and step `steps + 1` cut after `partial` of its 3 stores.
    fn image(pages: u64, steps: u64, partial: u32) -> Vec<u8> {
        let mut img = vec![0u8; (pages as usize + 1) * PAGE];
        let put = |img: &mut Vec<u8>, page: u64, index: usize, value: u64| {
            let at = page as usize * PAGE + index * 8;
            img[at..at + 8].copy_from_slice(&value.to_le_bytes());
        };
        put(&mut img, 0, 1, MAGIC);
        put(&mut img, 0, 2, pages);
        for i in 1..=steps + 1 {
            let page = 1 + i % pages;
            let stores = if i <= steps { 3 } else { partial };
            if stores >= 1 {
                put(&mut img, page, 0, i);
            }
            if stores >= 2 {
                put(&mut img, page, WORDS - 1, i);
            }
            if stores >= 3 {
                put(&mut img, 0, 0, i);
            }
        }
        img
    }

    #[test]
    fn every_instant_of_the_guest_passes() {
        for steps in [0, 1, 5, 7, 8, 9, 100, 1001] {
            for partial in 0..3 {
                let state = check(&image(8, steps, partial), 0)
                    .unwrap_or_else(|e| panic!("steps {steps} partial {partial}: {e}"));
                assert_eq!(state.seq, steps);
                assert_eq!(state.pages, 8);
                assert_eq!(state.in_flight, partial > 0);
            }
        }
    }

    #[test]
    fn a_page_older_or_newer_than_the_header_fails() {
        let mut img = image(8, 100, 0);
        // Page copied before the last steps (older than seq says)...
        let older = check(
            &{
                let mut i = img.clone();
                let at = (1 + 100 % 8) * PAGE;
                i[at..at + 8].copy_from_slice(&92u64.to_le_bytes());
                i
            },
            0,
        );
        assert!(older.unwrap_err().contains("data page 5"));
        // ...or after later steps (the header copied first).
        let at = (1 + 98 % 8) * PAGE + (WORDS - 1) * 8;
        img[at..at + 8].copy_from_slice(&106u64.to_le_bytes());
        assert!(check(&img, 0).unwrap_err().contains("data page 3"));
    }

    #[test]
    fn no_magic_or_a_short_image_is_an_error() {
        assert!(
            check(&vec![0u8; 2 * PAGE], 0)
                .unwrap_err()
                .contains("magic")
        );
        assert!(
            check(&image(8, 3, 0)[..4 * PAGE], 0)
                .unwrap_err()
                .contains("fit")
        );
        assert!(
            check(&image(8, 3, 0), 1 << 20)
                .unwrap_err()
                .contains("beyond")
        );
    }
}
