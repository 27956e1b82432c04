//! Host load and VM selection policy (placeholder; being written).
