//! [`List`]: a borrowed, read-only array that is either a native slice or still encoded.
//!
//! Decoding never allocates: an array in a message (MSR indices, GPAs, page-access entries)
//! stays in the receive buffer and is read element by element. A sender builds the same type
//! from a native slice. Both forms compare equal when their elements do, so a decoded message
//! can be compared with the one that was encoded.

use core::fmt;

/// A borrowed array of `T`: a native slice, or an array still in its wire encoding.
#[derive(Clone, Copy)]
pub struct List<'a, T: Copy> {
    repr: Repr<'a, T>,
}

#[derive(Clone, Copy)]
enum Repr<'a, T: Copy> {
    Native(&'a [T]),
    Encoded {
        bytes: &'a [u8],
        stride: usize,
        read: fn(&[u8]) -> T,
    },
}

impl<'a, T: Copy> List<'a, T> {
    /// A list over a native slice.
    pub const fn from_slice(items: &'a [T]) -> Self {
        Self {
            repr: Repr::Native(items),
        }
    }

    /// A list over `bytes`, elements of `stride` bytes each read by `read` (which gets
    /// exactly `stride` bytes). The caller has validated every element. A trailing partial
    /// element is ignored; a zero `stride` gives an empty list.
    pub(crate) fn encoded(bytes: &'a [u8], stride: usize, read: fn(&[u8]) -> T) -> Self {
        let bytes = match bytes.len().checked_div(stride) {
            Some(n) => bytes.get(..n * stride).unwrap_or(&[]),
            None => &[],
        };
        Self {
            repr: Repr::Encoded {
                bytes,
                stride,
                read,
            },
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self.repr {
            Repr::Native(items) => items.len(),
            Repr::Encoded { bytes, stride, .. } => bytes.len().checked_div(stride).unwrap_or(0),
        }
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The element at `index`, if any.
    pub fn get(&self, index: usize) -> Option<T> {
        match self.repr {
            Repr::Native(items) => items.get(index).copied(),
            Repr::Encoded {
                bytes,
                stride,
                read,
            } => {
                let start = index.checked_mul(stride)?;
                let chunk = bytes.get(start..start.checked_add(stride)?)?;
                Some(read(chunk))
            }
        }
    }

    /// The elements in order.
    pub fn iter(&self) -> Iter<'a, T> {
        Iter {
            list: *self,
            next: 0,
        }
    }
}

impl<T: Copy + PartialEq> PartialEq for List<'_, T> {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl<T: Copy + Eq> Eq for List<'_, T> {}

impl<T: Copy + fmt::Debug> fmt::Debug for List<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<'a, T: Copy> From<&'a [T]> for List<'a, T> {
    fn from(items: &'a [T]) -> Self {
        Self::from_slice(items)
    }
}

impl<'a, T: Copy> IntoIterator for List<'a, T> {
    type Item = T;
    type IntoIter = Iter<'a, T>;
    fn into_iter(self) -> Iter<'a, T> {
        self.iter()
    }
}

/// Iterator over a [`List`].
#[derive(Clone)]
pub struct Iter<'a, T: Copy> {
    list: List<'a, T>,
    next: usize,
}

impl<T: Copy> Iterator for Iter<'_, T> {
    type Item = T;
    fn next(&mut self) -> Option<T> {
        let item = self.list.get(self.next)?;
        self.next += 1;
        Some(item)
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.list.len().saturating_sub(self.next);
        (left, Some(left))
    }
}

impl<T: Copy> ExactSizeIterator for Iter<'_, T> {}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_u16(b: &[u8]) -> u16 {
        u16::from_le_bytes([b[0], b[1]])
    }

    #[test]
    fn encoded_and_native_lists_compare_by_elements() {
        let bytes = [1u8, 0, 2, 0, 3, 0];
        let encoded = List::encoded(&bytes, 2, read_u16);
        let native = List::from_slice(&[1u16, 2, 3]);
        assert_eq!(encoded.len(), 3);
        assert_eq!(encoded.get(2), Some(3));
        assert_eq!(encoded.get(3), None);
        assert_eq!(encoded, native);
        assert_ne!(encoded, List::from_slice(&[1u16, 2]));
        assert_eq!(encoded.iter().len(), 3);
    }

    #[test]
    fn encoded_list_ignores_trailing_partial_element_and_zero_stride() {
        let bytes = [1u8, 0, 2];
        assert_eq!(List::encoded(&bytes, 2, read_u16).len(), 1);
        assert!(List::encoded(&bytes, 0, read_u16).is_empty());
    }
}
