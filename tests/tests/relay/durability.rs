//! Durability: a send acknowledged to its sender survives a clean restart and a SIGKILL of the relay.

use std::sync::Arc;

use relay_tests::TestRelay;
use tokio::task::JoinSet;

use crate::{WAIT, bounded};

async fn acked_sends_survive(kill: bool) {
    let mut relay = TestRelay::process().await.expect("relay");
    let mut alice = relay.user("+33612345678").await.expect("alice");
    let mut bob = relay.user("+33698765432").await.expect("bob");
    let to = alice.messenger.contact("+33698765432").await.expect("lookup");
    let sender = Arc::new(alice.messenger);
    // Concurrent sends, so that acknowledgements come from shared (group) flushes.
    let mut sends = JoinSet::new();
    for i in 0..50 {
        let (sender, to) = (sender.clone(), to.clone());
        sends.spawn(async move { sender.send_to(&to, &format!("durable {i}")).await });
    }
    while let Some(r) = bounded("sends", sends.join_next()).await {
        r.expect("join").expect("acknowledged");
    }
    // The relay dies right after the last acknowledgement, before anyone received anything.
    if kill {
        relay.kill().await.expect("SIGKILL");
    } else {
        relay.stop().await.expect("SIGTERM");
    }
    relay.restart().await.expect("restart");

    bob.reconnect().await.expect("bob reconnects");
    let got = bob.messenger.receive(50, WAIT).await.expect("receive");
    let mut texts: Vec<_> = got.iter().map(|m| m.text.clone()).collect();
    texts.sort();
    let mut want: Vec<_> = (0..50).map(|i| format!("durable {i}")).collect();
    want.sort();
    assert_eq!(texts, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_sends_survive_sigkill() {
    acked_sends_survive(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_sends_survive_clean_restart() {
    acked_sends_survive(false).await;
}

#[tokio::test]
async fn relay_keeps_its_certificate_across_restarts() {
    let mut relay = TestRelay::process().await.expect("relay");
    let (addr, fp) = (relay.addr(), relay.fingerprint().to_owned());
    relay.stop().await.expect("stop");
    relay.restart().await.expect("restart");
    assert_eq!((relay.addr(), relay.fingerprint()), (addr, fp.as_str()), "clients' pins stay valid");
}
