//! Server ids of the JetStream mailboxes: a stream sequence is unique only in its shard's stream, so the id handed
//! out is `sequence × K + k` for shard k of K.
//!
//! Contract: ids are at least 1 (sequences start at 1) and unique across all shards; within one mailbox (one shard)
//! they increase with the sequence, which JetStream never reuses; [`ServerIds::split`] gives back the shard and
//! sequence of any id [`ServerIds::id`] made. K is fixed for the life of the data (the layout already requires it:
//! it decides every account's shard).

use relay_store_nats::Shard;

/// The id scheme of a layout with `shards` shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ServerIds {
    shards: u64,
}

impl ServerIds {
    /// The scheme for K = `shards` (at least 1).
    pub(crate) fn new(shards: u32) -> Self {
        Self { shards: u64::from(shards.max(1)) }
    }

    /// The id of sequence `seq` of shard `shard`; `None` past `u64::MAX` (a stream would need 2^64 / K messages).
    pub(crate) fn id(self, shard: Shard, seq: u64) -> Option<u64> {
        seq.checked_mul(self.shards)?.checked_add(u64::from(shard.0))
    }

    /// The shard and sequence of `id`.
    pub(crate) fn split(self, id: u64) -> (Shard, u64) {
        // The remainder is below K, itself a u32.
        (Shard(u32::try_from(id % self.shards).unwrap_or(u32::MAX)), id / self.shards)
    }

    /// The sequence cursor of shard `shard` equivalent to id cursor `after`: the sequences above it are exactly
    /// those whose ids are above `after`.
    pub(crate) fn cursor(self, shard: Shard, after: u64) -> u64 {
        after.checked_sub(u64::from(shard.0)).map_or(0, |rest| rest / self.shards)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_across_shards_and_split_back() {
        let ids = ServerIds::new(3);
        let mut seen = std::collections::HashSet::new();
        for k in 0..3 {
            for seq in 1..50 {
                let id = ids.id(Shard(k), seq).expect("id");
                assert!(id >= 1);
                assert!(seen.insert(id), "id {id} made twice");
                assert_eq!(ids.split(id), (Shard(k), seq));
            }
        }
        assert_eq!(ids.id(Shard(1), u64::MAX / 2), None, "overflow is refused, not wrapped");
        assert_eq!(ServerIds::new(1).id(Shard(0), 7), Some(7), "one shard: the sequence itself");
    }

    #[test]
    fn the_sequence_cursor_selects_exactly_the_ids_above_the_id_cursor() {
        let ids = ServerIds::new(4);
        for k in 0..4 {
            let shard = Shard(k);
            for after in 0..60 {
                let cursor = ids.cursor(shard, after);
                for seq in 1..20 {
                    let id = ids.id(shard, seq).expect("id");
                    assert_eq!(seq > cursor, id > after, "shard {k}, after {after}, seq {seq}");
                }
            }
        }
    }
}
