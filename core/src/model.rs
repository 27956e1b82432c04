//! Analytic time models of migration (placeholder; being written).
