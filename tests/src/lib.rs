//! End-to-end tests of Tributary: the real binary (as the `tributary-node`
//! child process, same entry point as `tributary`) or an in-process node,
//! driven over real sockets by real clients. The tests live in `tests/`; the
//! shared helpers in `tests/common/`.
