//! virtio-mem requests and responses as they are laid out in guest memory (virtio 1.2
//! section 5.15.6): a 24-byte request (`le16 type`, 6 bytes of padding, then `le64 addr`,
//! `le16 nb_blocks`, padding) and a 10-byte response (`le16 type`, padding, `le16 state`).

/// Request types.
pub const REQ_PLUG: u16 = 0;
pub const REQ_UNPLUG: u16 = 1;
pub const REQ_UNPLUG_ALL: u16 = 2;
pub const REQ_STATE: u16 = 3;
/// Response types.
pub const RESP_ACK: u16 = 0;
pub const RESP_NACK: u16 = 1;
pub const RESP_BUSY: u16 = 2;
pub const RESP_ERROR: u16 = 3;
/// Block range states (answer to `STATE`).
pub const STATE_PLUGGED: u16 = 0;
pub const STATE_UNPLUGGED: u16 = 1;
pub const STATE_MIXED: u16 = 2;

/// Size of a request in guest memory.
pub const REQUEST_LEN: usize = 24;
/// Size of a response in guest memory.
pub const RESPONSE_LEN: usize = 10;

/// A driver's request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Plug {
        addr: u64,
        nb_blocks: u16,
    },
    Unplug {
        addr: u64,
        nb_blocks: u16,
    },
    UnplugAll,
    State {
        addr: u64,
        nb_blocks: u16,
    },
    /// A type this device does not know.
    Unknown(u16),
}

impl Request {
    /// Decodes the request's bytes.
    pub fn parse(b: &[u8; REQUEST_LEN]) -> Request {
        let ty = u16::from_le_bytes([b[0], b[1]]);
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[8..16]);
        let addr = u64::from_le_bytes(a);
        let nb_blocks = u16::from_le_bytes([b[16], b[17]]);
        match ty {
            REQ_PLUG => Request::Plug { addr, nb_blocks },
            REQ_UNPLUG => Request::Unplug { addr, nb_blocks },
            REQ_UNPLUG_ALL => Request::UnplugAll,
            REQ_STATE => Request::State { addr, nb_blocks },
            other => Request::Unknown(other),
        }
    }

    /// Encodes a request (for tests and tools).
    pub fn to_bytes(self) -> [u8; REQUEST_LEN] {
        let (ty, addr, nb) = match self {
            Request::Plug { addr, nb_blocks } => (REQ_PLUG, addr, nb_blocks),
            Request::Unplug { addr, nb_blocks } => (REQ_UNPLUG, addr, nb_blocks),
            Request::UnplugAll => (REQ_UNPLUG_ALL, 0, 0),
            Request::State { addr, nb_blocks } => (REQ_STATE, addr, nb_blocks),
            Request::Unknown(t) => (t, 0, 0),
        };
        let mut b = [0u8; REQUEST_LEN];
        b[0..2].copy_from_slice(&ty.to_le_bytes());
        b[8..16].copy_from_slice(&addr.to_le_bytes());
        b[16..18].copy_from_slice(&nb.to_le_bytes());
        b
    }
}

/// The state of a block range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Plugged,
    Unplugged,
    Mixed,
}

/// The device's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Response {
    /// Done; with the state for a `STATE` request.
    Ack(Option<State>),
    /// Not now (plugging past the requested size).
    Nack,
    /// Invalid request.
    Error,
}

impl Response {
    pub fn to_bytes(self) -> [u8; RESPONSE_LEN] {
        let (ty, state) = match self {
            Response::Ack(s) => (
                RESP_ACK,
                match s {
                    None | Some(State::Plugged) => STATE_PLUGGED,
                    Some(State::Unplugged) => STATE_UNPLUGGED,
                    Some(State::Mixed) => STATE_MIXED,
                },
            ),
            Response::Nack => (RESP_NACK, 0),
            Response::Error => (RESP_ERROR, 0),
        };
        let mut b = [0u8; RESPONSE_LEN];
        b[0..2].copy_from_slice(&ty.to_le_bytes());
        b[8..10].copy_from_slice(&state.to_le_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_unknown_types_are_kept() {
        for r in [
            Request::Plug {
                addr: 0x1_0000_0000,
                nb_blocks: 3,
            },
            Request::Unplug {
                addr: u64::MAX,
                nb_blocks: u16::MAX,
            },
            Request::UnplugAll,
            Request::State {
                addr: 7,
                nb_blocks: 1,
            },
            Request::Unknown(0xbeef),
        ] {
            assert_eq!(Request::parse(&r.to_bytes()), r);
        }
        let mut b = [0u8; REQUEST_LEN];
        b[0] = 3;
        b[8] = 0x10;
        b[16] = 2;
        assert_eq!(
            Request::parse(&b),
            Request::State {
                addr: 0x10,
                nb_blocks: 2
            }
        );
    }

    #[test]
    fn responses_are_laid_out_as_linux_reads_them() {
        assert_eq!(Response::Ack(None).to_bytes(), [0; RESPONSE_LEN]);
        assert_eq!(
            Response::Ack(Some(State::Mixed)).to_bytes(),
            [0, 0, 0, 0, 0, 0, 0, 0, 2, 0]
        );
        assert_eq!(Response::Ack(Some(State::Unplugged)).to_bytes()[8], 1);
        assert_eq!(Response::Nack.to_bytes()[0], RESP_NACK as u8);
        assert_eq!(Response::Error.to_bytes()[0], RESP_ERROR as u8);
        assert_eq!(RESP_BUSY, 2);
    }
}
