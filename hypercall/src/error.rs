//! Hypercall results: one error enum, carried negated in RAX.
//!
//! A hypercall returns a non-negative value (as `i64`) on success and a value in
//! `-4095..=-1` on failure, as Linux system calls do. Successful results are bounded by
//! [`MAX_RESULT`] so a success can never be mistaken for an error: [`encode`] refuses to
//! return a success above it (it becomes [`HcError::InvalidArgument`], never an error look-alike).

/// The largest value a successful hypercall may return.
pub const MAX_RESULT: u64 = i64::MAX as u64;

/// Why a hypercall failed. The discriminant is the value placed in RAX (as `i64`).
#[repr(i64)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum HcError {
    /// Unknown or zero hypercall number.
    #[error("unknown hypercall number")]
    NoSys = -1,
    /// No outstanding token matches the presented one.
    #[error("no such map token")]
    BadToken = -2,
    /// The token expired or was already used.
    #[error("map token expired or already used")]
    TokenExpired = -3,
    /// The token was issued for another target VM.
    #[error("map token belongs to another target")]
    WrongTarget = -4,
    /// A target address is beyond the target's memory.
    #[error("target address out of range")]
    OutOfRange = -5,
    /// An address that must be page-aligned is not.
    #[error("address not page-aligned")]
    Unaligned = -6,
    /// A window address lies outside the caller's map window.
    #[error("address outside the map window")]
    OutsideWindow = -7,
    /// A page count is zero or above the per-call limit, or outside what the token grants.
    #[error("page count zero or too large")]
    TooManyPages = -8,
    /// The resource is busy (e.g. the window page is mapped already); retry later.
    #[error("busy, try again")]
    Busy = -9,
    /// An argument is malformed.
    #[error("invalid argument")]
    InvalidArgument = -10,
    /// Nothing is mapped at the window address.
    #[error("window address not mapped")]
    NotMapped = -11,
    /// The token address is not readable guest memory of the caller.
    #[error("token address not readable")]
    Fault = -12,
    /// The caller may not use this hypercall (e.g. a target calling MEM_MAP).
    #[error("hypercall not permitted for this VM")]
    NotPermitted = -13,
    /// The host could not allocate what the call needs.
    #[error("host out of resources")]
    NoMemory = -14,
    /// A negative result this ABI version does not know (from a newer peer).
    #[error("unrecognized error code")]
    Unrecognized = -4095,
}

impl HcError {
    /// Every error, for tables and tests.
    pub const ALL: [HcError; 15] = [
        HcError::NoSys,
        HcError::BadToken,
        HcError::TokenExpired,
        HcError::WrongTarget,
        HcError::OutOfRange,
        HcError::Unaligned,
        HcError::OutsideWindow,
        HcError::TooManyPages,
        HcError::Busy,
        HcError::InvalidArgument,
        HcError::NotMapped,
        HcError::Fault,
        HcError::NotPermitted,
        HcError::NoMemory,
        HcError::Unrecognized,
    ];

    /// The signed code.
    pub const fn code(self) -> i64 {
        self as i64
    }

    /// The value written to RAX.
    pub const fn to_rax(self) -> u64 {
        self.code() as u64
    }
}

impl From<HcError> for i64 {
    fn from(err: HcError) -> i64 {
        err.code()
    }
}

impl TryFrom<i64> for HcError {
    /// The code is not one this ABI defines (the value itself is returned).
    type Error = i64;

    fn try_from(code: i64) -> Result<Self, i64> {
        HcError::ALL
            .into_iter()
            .find(|e| e.code() == code)
            .ok_or(code)
    }
}

/// Encodes a hypercall outcome as the RAX value. A success above [`MAX_RESULT`] cannot be
/// represented and is reported as [`HcError::InvalidArgument`].
pub const fn encode(result: Result<u64, HcError>) -> u64 {
    match result {
        Ok(value) if value <= MAX_RESULT => value,
        Ok(_) => HcError::InvalidArgument.to_rax(),
        Err(err) => err.to_rax(),
    }
}

/// Decodes RAX after a hypercall. Negative values are errors; a negative value this version
/// does not know is [`HcError::Unrecognized`].
pub fn decode(rax: u64) -> Result<u64, HcError> {
    let signed = rax as i64;
    if signed >= 0 {
        Ok(rax)
    } else {
        Err(HcError::try_from(signed).unwrap_or(HcError::Unrecognized))
    }
}

const _: () = {
    // Every error is negative and within the Linux-style error window, so no success
    // (0..=MAX_RESULT) can equal one.
    let mut i = 0;
    while i < HcError::ALL.len() {
        let code = HcError::ALL[i].code();
        assert!(code < 0 && code >= -4095);
        assert!(HcError::ALL[i].to_rax() > MAX_RESULT);
        i += 1;
    }
    assert!(encode(Ok(MAX_RESULT)) == MAX_RESULT);
    assert!(encode(Ok(MAX_RESULT + 1)) == HcError::InvalidArgument.to_rax());
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_round_trip_through_codes_and_rax() {
        for err in HcError::ALL {
            assert_eq!(HcError::try_from(i64::from(err)), Ok(err));
            assert_eq!(decode(encode(Err(err))), Err(err));
        }
        assert_eq!(HcError::try_from(-77), Err(-77));
        assert_eq!(HcError::try_from(0), Err(0));
    }

    #[test]
    fn codes_are_unique() {
        for (i, a) in HcError::ALL.iter().enumerate() {
            for b in &HcError::ALL[i + 1..] {
                assert_ne!(a.code(), b.code());
            }
        }
    }

    #[test]
    fn successes_never_decode_as_errors() {
        for value in [0, 1, 4096, MAX_RESULT] {
            assert_eq!(decode(encode(Ok(value))), Ok(value));
        }
        assert_eq!(decode(encode(Ok(u64::MAX))), Err(HcError::InvalidArgument));
        assert_eq!(decode((-77i64) as u64), Err(HcError::Unrecognized));
        assert_eq!(decode(u64::MAX), Err(HcError::NoSys));
    }
}
