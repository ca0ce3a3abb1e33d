//! What more than one fuzz target needs.

use std::sync::OnceLock;

/// One tokio runtime for a target's whole run (current thread; blocking
/// work goes to its pool).
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    })
}
