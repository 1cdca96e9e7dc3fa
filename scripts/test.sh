#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit and integration tests (with
# the fault-injection feature the wedge tests need).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --locked --all-targets -- -D warnings
cargo clippy --locked --all-targets --all-features -- -D warnings
echo "== cargo test"
cargo test --locked --all-features
