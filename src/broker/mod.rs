//! The MQTT side: our TCP listener and per-client connections on top of rumqttd's router.

pub mod conn;
pub mod engine;
pub mod flow;
pub mod share;
pub mod wire;

pub use engine::Engine;

use std::sync::Arc;
use tokio::net::TcpListener;

/// Binds the MQTT listener. A taken port is a one-line error naming the address and the flag.
pub async fn bind(addr: &str) -> Result<TcpListener, String> {
    TcpListener::bind(addr).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            format!("cannot listen on {addr}: address already in use (choose another with --listen ADDR or listener.tcp.external)")
        }
        _ => format!("cannot listen on {addr}: {e} (set --listen ADDR or listener.tcp.external)"),
    })
}

/// Accepts connections until the listener fails.
pub async fn accept_loop(listener: TcpListener, engine: Arc<Engine>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                tokio::spawn(conn::serve(stream, peer, engine.clone()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}
