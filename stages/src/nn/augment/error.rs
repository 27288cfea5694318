//! The error type of the augmentation engine.

/// What can go wrong when configuring a view generator or feeding it images.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AugmentError {
    /// The byte buffer does not hold `n` images of the stated shape.
    #[error(
        "image buffer has {got} bytes, expected {expected} for {n} images of 3x{height}x{width}"
    )]
    BufferSize {
        /// Bytes given.
        got: usize,
        /// Bytes needed: `n * 3 * height * width`.
        expected: usize,
        /// Number of images.
        n: usize,
        /// Image height.
        height: usize,
        /// Image width.
        width: usize,
    },
    /// An image side is zero.
    #[error("images must be at least 1x1, got {height}x{width}")]
    EmptyImage {
        /// Image height.
        height: usize,
        /// Image width.
        width: usize,
    },
    /// A configuration value is out of its range.
    #[error("invalid augmentation config: {field}: {reason}")]
    InvalidConfig {
        /// The offending field, e.g. `pipeline.jitter.hue`.
        field: &'static str,
        /// Why it is rejected.
        reason: String,
    },
    /// The input images do not fit the pipeline's geometry.
    #[error("{what}: input images are {height}x{width}, output size is {size}")]
    Geometry {
        /// What does not fit.
        what: &'static str,
        /// Image height.
        height: usize,
        /// Image width.
        width: usize,
        /// Output side.
        size: usize,
    },
}

impl AugmentError {
    /// An [`AugmentError::InvalidConfig`].
    pub(crate) fn config(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidConfig {
            field,
            reason: reason.into(),
        }
    }
}

/// Checks that `p` is a probability.
pub(crate) fn check_probability(field: &'static str, p: f64) -> Result<(), AugmentError> {
    if (0.0..=1.0).contains(&p) {
        Ok(())
    } else {
        Err(AugmentError::config(field, format!("{p} is not in [0, 1]")))
    }
}

/// Checks that `range` is finite, positive and ordered (`0 < lo <= hi`).
pub(crate) fn check_positive_range(
    field: &'static str,
    range: [f64; 2],
) -> Result<(), AugmentError> {
    let [lo, hi] = range;
    if lo.is_finite() && hi.is_finite() && lo > 0.0 && lo <= hi {
        Ok(())
    } else {
        Err(AugmentError::config(
            field,
            format!("[{lo}, {hi}] must satisfy 0 < lo <= hi"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_reject_bad_values() {
        assert!(check_probability("p", 0.0).is_ok());
        assert!(check_probability("p", 1.0).is_ok());
        assert!(check_probability("p", 1.5).is_err());
        assert!(check_probability("p", f64::NAN).is_err());
        assert!(check_positive_range("r", [0.5, 0.5]).is_ok());
        assert!(check_positive_range("r", [0.6, 0.5]).is_err());
        assert!(check_positive_range("r", [0.0, 0.5]).is_err());
        let e = check_probability("pipeline.hflip_p", -1.0).expect_err("rejected");
        assert_eq!(
            e.to_string(),
            "invalid augmentation config: pipeline.hflip_p: -1 is not in [0, 1]"
        );
    }
}
