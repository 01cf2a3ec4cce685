//! The image's profile: facts an introspection tool needs, published as ELF symbols
//! (`kvmi_profile.<kind>.<name>`, see notes/profile-convention.md). Every value comes from
//! the code itself (`sym`, `offset_of!`, `size_of`), so it is exact by construction.

use core::mem::{offset_of, size_of};

use crate::memory::{self, KERNEL_STATS, SECRET_BUFFER};
use crate::sched::task_switch;
use crate::task::{self, MAX_TASKS, NAME_LEN, TASK_TABLE, Task, TaskTable, state, task_create};
use crate::workload::{self, Kind};

core::arch::global_asm!(
    ".macro KVMI_PROFILE name, value",
    "    .globl \"kvmi_profile.\\name\"",
    "    .set \"kvmi_profile.\\name\", \\value",
    ".endm",
    // Kernel objects and functions.
    "KVMI_PROFILE sym.task_table, {task_table}",
    "KVMI_PROFILE sym.task_create, {task_create}",
    "KVMI_PROFILE sym.task_switch, {task_switch}",
    "KVMI_PROFILE sym.secret_buffer, {secret_buffer}",
    "KVMI_PROFILE sym.kernel_stats, {kernel_stats}",
    "KVMI_PROFILE sym.rootkit_tamper, {tamper}",
    // Constants.
    "KVMI_PROFILE const.max_tasks, {max_tasks}",
    "KVMI_PROFILE const.task_name_len, {name_len}",
    "KVMI_PROFILE const.task_state_free, {state_free}",
    "KVMI_PROFILE const.task_state_ready, {state_ready}",
    "KVMI_PROFILE const.task_state_running, {state_running}",
    "KVMI_PROFILE const.task_state_exited, {state_exited}",
    "KVMI_PROFILE const.task_kind_rootkit, {kind_rootkit}",
    "KVMI_PROFILE const.task_kind_secret_reader, {kind_reader}",
    "KVMI_PROFILE const.user_base, {user_base}",
    "KVMI_PROFILE const.secret_alias, {secret_alias}",
    "KVMI_PROFILE const.task_table_alias, {table_alias}",
    "KVMI_PROFILE const.agent_hypercall_nr, 34",
    // struct task.
    "KVMI_PROFILE struct.task.pid, {pid}",
    "KVMI_PROFILE struct.task.state, {state}",
    "KVMI_PROFILE struct.task.parent, {parent}",
    "KVMI_PROFILE struct.task.cpu, {cpu}",
    "KVMI_PROFILE struct.task.name, {name}",
    "KVMI_PROFILE struct.task.cr3, {cr3}",
    "KVMI_PROFILE struct.task.fs_base, {fs_base}",
    "KVMI_PROFILE struct.task.gs_base, {gs_base}",
    "KVMI_PROFILE struct.task.kind, {kind}",
    "KVMI_PROFILE struct.task.exit_status, {exit_status}",
    "KVMI_PROFILE struct.task.switches, {switches}",
    "KVMI_PROFILE struct.task.syscalls, {syscalls}",
    "KVMI_PROFILE struct.task.created_round, {created_round}",
    "KVMI_PROFILE sizeof.task, {task_size}",
    // struct kernel_stats.
    "KVMI_PROFILE struct.kernel_stats.rounds, {ks_rounds}",
    "KVMI_PROFILE struct.kernel_stats.user_writes, {ks_user_writes}",
    "KVMI_PROFILE struct.kernel_stats.last_writer, {ks_last_writer}",
    "KVMI_PROFILE struct.kernel_stats.tasks_created, {ks_created}",
    "KVMI_PROFILE struct.kernel_stats.switches, {ks_switches}",
    "KVMI_PROFILE sizeof.kernel_stats, {ks_size}",
    // Ranges [start, end). kernel_text, user_text and kernel_data come from link.ld.
    "KVMI_PROFILE range.task_table.start, {task_table}",
    "KVMI_PROFILE range.task_table.end, {task_table} + {table_size}",
    "KVMI_PROFILE range.kernel_stats.start, {kernel_stats}",
    "KVMI_PROFILE range.kernel_stats.end, {kernel_stats} + {ks_size}",
    "KVMI_PROFILE range.secret_buffer.start, {secret_buffer}",
    "KVMI_PROFILE range.secret_buffer.end, {secret_buffer} + {secret_size}",
    task_table = sym TASK_TABLE,
    task_create = sym task_create,
    task_switch = sym task_switch,
    secret_buffer = sym SECRET_BUFFER,
    kernel_stats = sym KERNEL_STATS,
    tamper = sym workload::tamper,
    max_tasks = const MAX_TASKS,
    name_len = const NAME_LEN,
    state_free = const state::FREE,
    state_ready = const state::READY,
    state_running = const state::RUNNING,
    state_exited = const state::EXITED,
    kind_rootkit = const Kind::Rootkit as u32,
    kind_reader = const Kind::SecretReader as u32,
    user_base = const memory::USER_BASE,
    secret_alias = const memory::SECRET_ALIAS,
    table_alias = const memory::TABLE_ALIAS,
    pid = const offset_of!(Task, pid),
    state = const offset_of!(Task, state),
    parent = const offset_of!(Task, parent),
    cpu = const offset_of!(Task, cpu),
    name = const offset_of!(Task, name),
    cr3 = const offset_of!(Task, cr3),
    fs_base = const offset_of!(Task, fs_base),
    gs_base = const offset_of!(Task, gs_base),
    kind = const offset_of!(Task, kind),
    exit_status = const offset_of!(Task, exit_status),
    switches = const offset_of!(Task, switches),
    syscalls = const offset_of!(Task, syscalls),
    created_round = const offset_of!(Task, created_round),
    task_size = const size_of::<Task>(),
    table_size = const size_of::<TaskTable>(),
    ks_rounds = const offset_of!(memory::KernelStats, rounds),
    ks_user_writes = const offset_of!(memory::KernelStats, user_writes),
    ks_last_writer = const offset_of!(memory::KernelStats, last_writer),
    ks_created = const offset_of!(memory::KernelStats, tasks_created),
    ks_switches = const offset_of!(memory::KernelStats, switches),
    ks_size = const size_of::<memory::KernelStats>(),
    secret_size = const size_of::<memory::SecretBuffer>(),
);

// Keep `task` referenced for the docs above even when unused elsewhere.
const _: usize = task::MAX_TASKS;
