//! The lock order of the introspection engine and the appliance link, in one place.
//!
//! Every lock of both crates is a [`RankedMutex`](vmm::sync::RankedMutex) with one of the
//! ranks below. A thread takes locks only in increasing rank; debug builds check every
//! acquisition (see [`vmm::sync`]), so the whole test suite checks this table. The VMM
//! core's locks rank above all of these and are leaves.
//!
//! Nesting that exists (outer → inner):
//! - a ring consumer of the appliance link (command ring, reply ring) → every engine lock →
//!   the ring producers: a message read from a ring is handled by the engine with its ring
//!   still held, and the engine's answer goes out on a producer ring;
//! - the appliance lifecycle's current attachment → everything its retirement takes;
//! - the pager's grant map → the token verifier (a grant uses up its token);
//! - a token issuer → its key's use notices (issuing counts the tokens known to be used);
//! - a vCPU slot → the breakpoint table (a vCPU computes its guest-debug state), and → the
//!   link (a vCPU waiting for its reply asks when the tool was last heard);
//! - the appliance lifecycle's `current` → the ring service's thread handle (stopping an
//!   attached appliance);
//! - everything else is taken alone: the engine copies what it needs and releases a lock
//!   before sending to a tool, kicking a vCPU or calling into a transport.
//!
//! Never held across a blocking send to a tool: the link, the slots, the access table. (No
//! lock is: the socket transport waits for room in the socket holding nothing, and its
//! close, every detach, takes no lock.)

use vmm::sync::Rank;

/// A fleet's state (`appliance_link::fleet`: its appliance and its targets' slots): held
/// while a target is attached, detached or started and while the appliance is replaced.
pub const FLEET: Rank = Rank::new(0, "link.fleet");
/// The appliance lifecycle's current attachment (`appliance_link::launch`): held while an
/// appliance is retired (its grants revoked, its ring service stopped, the engine detached)
/// and its successor booted.
pub const APPLIANCE_CURRENT: Rank = Rank::new(1, "link.appliance_current");
/// The appliance's command ring consumer and its buffer: held while each command it holds
/// is handled by the engine (the NOTIFY path and the ring service).
pub const COMMAND_INBOX: Rank = Rank::new(2, "link.command_inbox");
/// A vCPU's reply ring consumer: held while each reply is handed to the engine.
pub const REPLY_RING: Rank = Rank::new(3, "link.reply_ring");
/// A vCPU's introspection state (`slot::VcpuSlot`).
pub const SLOT: Rank = Rank::new(10, "engine.slot");
/// The attached tool and its generation (`Introspector::link`).
pub const LINK: Rank = Rank::new(15, "engine.link");
/// The appliance lifecycle's end report.
pub const APPLIANCE_ENDED: Rank = Rank::new(21, "link.appliance_ended");
/// The page-access table.
pub const ACCESS: Rank = Rank::new(40, "engine.access");
/// The breakpoint table.
pub const BREAKPOINTS: Rank = Rank::new(50, "engine.breakpoints");
/// The MSR filter's current list.
pub const MSR_FILTER: Rank = Rank::new(60, "engine.msr_filter");
/// The pager's map of granted window pages: held while a grant consumes its token.
pub const PAGER_MAPPED: Rank = Rank::new(65, "link.pager_mapped");
/// A map-token issuer's state, or a verifier's remembered nonces (never both at once).
pub const TOKENS: Rank = Rank::new(70, "engine.tokens");
/// The use notices a target key's verifier leaves for its issuer (taken under the issuer's
/// state).
pub const TOKEN_NOTICES: Rank = Rank::new(71, "engine.token_notices");
/// A libkvmi session's state (its event enables, reply switch, outstanding events): taken
/// alone, copied out before the engine or the socket is called.
pub const LIBKVMI_SESSION: Rank = Rank::new(90, "engine.libkvmi_session");
/// The socket server's current libkvmi session (for UNHOOK).
pub const SOCKET_SESSION: Rank = Rank::new(99, "engine.socket_session");
/// The socket server's current connection.
pub const SOCKET_CURRENT: Rank = Rank::new(100, "engine.socket_current");
/// The socket server's thread handle.
pub const SOCKET_THREAD: Rank = Rank::new(101, "engine.socket_thread");
/// The socket channel's outbox (the bytes of messages not yet taken by the tool): held only
/// across non-blocking writes, never while waiting for the tool to read.
pub const SOCKET_WRITER: Rank = Rank::new(102, "engine.socket_writer");
/// The ring service's thread handle.
pub const RING_SERVICE_THREAD: Rank = Rank::new(110, "link.ring_service_thread");
/// A vCPU's event ring producer.
pub const EVENT_RING: Rank = Rank::new(113, "link.event_ring");
/// The command-reply ring producer.
pub const COMMAND_REPLY_RING: Rank = Rank::new(114, "link.command_reply_ring");
/// The appliance's log sink.
pub const APPLIANCE_LOG: Rank = Rank::new(120, "link.appliance_log");
/// The host-process agent server's thread handle.
pub const HOST_AGENT_THREAD: Rank = Rank::new(130, "link.host_agent_thread");
