//! Shared helpers live in `treaty-harness`; this crate only hosts the end-to-end test binary.
