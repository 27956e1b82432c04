//! Dirty-page traces (placeholder; being written).
