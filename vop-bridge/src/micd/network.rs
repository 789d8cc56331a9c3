//! The address plan for several cards, as MPSS had it
//! (`/work/shared/facts/mic-host-stack.md`, mpssd): card N is
//! 172.31.(N+1).1/24 and the host is 172.31.(N+1).254 on `micN`. The card
//! image takes them as `mic.ip` and `mic.host` (`guest-images/README.md`).

use std::net::Ipv4Addr;

/// One card's addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CardNet {
    /// The card's address.
    pub card: Ipv4Addr,
    /// The host's address on the card's link (the card's gateway).
    pub host: Ipv4Addr,
    /// Prefix length.
    pub prefix: u8,
}

impl CardNet {
    /// The addresses of card `index` (`micN`, N < 255).
    pub fn for_card(index: u16) -> Self {
        let subnet = (index + 1).min(255) as u8;
        CardNet {
            card: Ipv4Addr::new(172, 31, subnet, 1),
            host: Ipv4Addr::new(172, 31, subnet, 254),
            prefix: 24,
        }
    }

    /// The card's address with its prefix (`172.31.1.1/24`).
    pub fn card_cidr(&self) -> String {
        format!("{}/{}", self.card, self.prefix)
    }

    /// The host's address with its prefix (`172.31.1.254/24`).
    pub fn host_cidr(&self) -> String {
        format!("{}/{}", self.host, self.prefix)
    }

    /// Kernel parameters that give the card these addresses.
    pub fn kernel_params(&self) -> String {
        format!("mic.ip={} mic.host={}", self.card_cidr(), self.host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan() {
        let n0 = CardNet::for_card(0);
        assert_eq!(n0.card_cidr(), "172.31.1.1/24");
        assert_eq!(n0.host, Ipv4Addr::new(172, 31, 1, 254));
        let n7 = CardNet::for_card(7);
        assert_eq!(
            n7.kernel_params(),
            "mic.ip=172.31.8.1/24 mic.host=172.31.8.254"
        );
        assert_eq!(n7.host_cidr(), "172.31.8.254/24");
    }
}
