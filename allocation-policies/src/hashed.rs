//! Weighted rendezvous (highest random weight) hashing: every (device, hub) pair gets a
//! pseudo-random score scaled by the hub's weight; hubs ranked by score give the first choice
//! and the fall-backs. The ranking depends only on the registration id and the hub list, so
//! every replica and every restart agrees, and adding a hub moves only the devices it wins.

use sha2::{Digest, Sha256};

/// A hub that can take devices, with its allocation weight (1 to 1000).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WeightedHub<'a> {
    /// The hub's host name.
    pub host_name: &'a str,
    /// Its weight; 0 is treated as 1.
    pub weight: u32,
}

/// Ranks `hubs` for `registration_id` (compared case-insensitively): first choice first.
pub fn rank<'a>(registration_id: &str, hubs: &[WeightedHub<'a>]) -> Vec<&'a str> {
    let device = registration_id.to_ascii_lowercase();
    let mut scored: Vec<(f64, &'a str)> = hubs
        .iter()
        .map(|hub| (score(&device, hub), hub.host_name))
        .collect();
    // Ties (practically impossible) fall back to the host name, so the order is total.
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    scored.into_iter().map(|(_, host)| host).collect()
}

fn score(device: &str, hub: &WeightedHub<'_>) -> f64 {
    let digest = Sha256::new()
        .chain_update(device.as_bytes())
        .chain_update([0u8])
        .chain_update(hub.host_name.to_ascii_lowercase().as_bytes())
        .finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    // A uniform number in (0, 1), never 0 or 1.
    let unit = (u64::from_be_bytes(first) as f64 + 0.5) / 18_446_744_073_709_551_616.0;
    f64::from(hub.weight.max(1)) / -unit.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hubs(weights: &[u32]) -> Vec<(String, u32)> {
        weights
            .iter()
            .enumerate()
            .map(|(i, w)| (format!("hub-{i}.example.com"), *w))
            .collect()
    }

    fn choices(devices: usize, hubs: &[(String, u32)]) -> Vec<String> {
        let weighted: Vec<WeightedHub<'_>> = hubs
            .iter()
            .map(|(h, w)| WeightedHub {
                host_name: h,
                weight: *w,
            })
            .collect();
        (0..devices)
            .map(|i| rank(&format!("device-{i}"), &weighted)[0].to_owned())
            .collect()
    }

    const DEVICES: usize = 100_000;

    #[test]
    fn shares_follow_weights_within_one_point() {
        let hubs = hubs(&[1, 2, 3]);
        let picks = choices(DEVICES, &hubs);
        for (i, (host, _)) in hubs.iter().enumerate() {
            let share = picks.iter().filter(|p| *p == host).count() as f64 / DEVICES as f64;
            let target = (i + 1) as f64 / 6.0;
            assert!(
                (share - target).abs() <= 0.01,
                "{host}: {share} vs {target}"
            );
        }
    }

    #[test]
    fn adding_a_hub_moves_at_most_its_share_plus_one_point() {
        let before = choices(DEVICES, &hubs(&[1, 2, 3]));
        let after = choices(DEVICES, &hubs(&[1, 2, 3, 2]));
        let mut moved = 0;
        for (b, a) in before.iter().zip(&after) {
            if a != b {
                assert_eq!(
                    a, "hub-3.example.com",
                    "a device moved from {b} to an old hub"
                );
                moved += 1;
            }
        }
        let new_share = 2.0 / 8.0;
        let moved_share = moved as f64 / DEVICES as f64;
        assert!(moved_share <= new_share + 0.01, "{moved_share} moved");
        assert!(
            moved_share >= new_share - 0.01,
            "the new hub wins its share: {moved_share}"
        );
    }

    #[test]
    fn the_ranking_is_stable_and_ignores_case() {
        let owned = hubs(&[5, 1]);
        let hubs: Vec<WeightedHub<'_>> = owned
            .iter()
            .map(|(h, w)| WeightedHub {
                host_name: h,
                weight: *w,
            })
            .collect();
        assert_eq!(rank("Dev-1", &hubs), rank("dev-1", &hubs));
        assert_eq!(rank("dev-1", &hubs).len(), 2);
        assert!(rank("dev-1", &[]).is_empty());
    }
}
