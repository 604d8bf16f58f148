"""Reasons for the mutants no test kills (docs/mutation.md). Key: mutant name suffix."""
E = "equivalent"
G = "not killed"
R = {
 # cache.py
 "cache.xǁRegisterCacheǁ__init____mutmut_23": (E, "plain_writes only picks regfile's inlined copy of write(); None takes write() itself, same effect"),
 "cache.xǁRegisterCacheǁwrite__mutmut_4": (E, "0 then takes the negative branch: 0 & mask == 0"),
 "cache.xǁRegisterCacheǁwrite__mutmut_5": (E, "as write__4: `value < 1` differs from `< 0` only for 0, which masks to 0"),
 "cache.xǁRegisterCacheǁ_fetch__mutmut_8": (E, "takes back queued kvm_dirty_regs writes before any fetch; they are dirty again and re-queued by the next flush: same kernel state"),
 "cache.xǁRegisterCacheǁ_fetch__mutmut_12": (E, "flush(stale) returns at once when no stale group is dirty"),
 "cache.xǁRegisterCacheǁ_fetch__mutmut_14": (E, "allow_defer=None is falsy like False"),
 "cache.xǁRegisterCacheǁ_fetch__mutmut_20": (E, "pending groups always have edits, so `edited` is empty exactly when pending is 0 and _kernel_view(0, []) returns {}"),
 "cache.xǁRegisterCacheǁ_report_contradictions__mutmut_26": (G, "stacklevel (where the warning points): mutmut's trampolines add frames, so no test can pin it under the tool"),
 "cache.xǁRegisterCacheǁ_report_contradictions__mutmut_28": (G, "as _report_contradictions__26"),
 "cache.xǁRegisterCacheǁsynchronize__mutmut_12": (E, "`done` is only consulted for the group being visited, which the loop visits once"),
 "cache.xǁRegisterCacheǁsynchronize__mutmut_28": (E, "as synchronize__12"),
 "cache.xǁRegisterCacheǁsynchronize__mutmut_29": (E, "as synchronize__12"),
 "cache.xǁRegisterCacheǁsynchronize__mutmut_21": (E, "todo holds only unheld or volatile groups; an unheld non-volatile group skipped by the first loop is fetched by the second (mask & ~held)"),
 "cache.xǁRegisterCacheǁsynchronize__mutmut_22": (E, "as synchronize__21 (the first clause becomes always false)"),
 "cache.xǁRegisterCacheǁsynchronize__mutmut_23": (E, "every group in todo is fetched once either way (todo = unheld | volatile)"),
 "cache.xǁRegisterCacheǁsynchronize__mutmut_24": (E, "as synchronize__23"),
 "cache.xǁRegisterCacheǁflush__mutmut_2": (E, "the owner test is repeated inside _check_thread(); the outer test only skips a call"),
 "cache.xǁRegisterCacheǁflush__mutmut_11": (E, "skips the no-syscall shortcut; store() queues held sync groups in kvm_dirty_regs the same way"),
 "cache.xǁRegisterCacheǁflush__mutmut_43": (E, "every register in FlushError.done came from the dirty dict, pop() never misses"),
 "cache.xǁRegisterCacheǁ_undefer__mutmut_11": (E, "allow_defer=None is falsy like False"),
 "cache.xǁRegisterCacheǁafter_run__mutmut_3": (E, "after_run gets unapplied only after a flush that left nothing dirty but the queued groups"),
 "cache.xǁRegisterCacheǁafter_run__mutmut_26": (E, "as after_run__25"),
 "cache.xǁRegisterCacheǁtake_back_deferred__mutmut_1": (E, "in_flight and transport.deferred are set and cleared together (defer/store/cancel_deferred/after_run)"),
 "cache.xǁRegisterCacheǁtake_back_deferred__mutmut_2": (E, "ioctl=None is falsy like False"),
 "cache.xǁRegisterCacheǁput__mutmut_3": (E, "taking back other queued groups re-queues them at the next flush: same kernel state"),
 "cache.xǁRegisterCacheǁput__mutmut_4": (E, "as put__3"),
 "cache.xǁRegisterCacheǁput__mutmut_6": (E, "ioctl=None is falsy like False"),
 "cache.xǁRegisterCacheǁput__mutmut_7": (E, "the queued write is written by ioctl, then put() writes over it: same kernel state"),
 # vcpu.py
 "vcpu.xǁVcpuǁ_complete_pending_io__mutmut_2": (E, "KVM tests immediate_exit for non-zero"),
 "vcpu.xǁVcpuǁ_complete_pending_io__mutmut_12": (E, "as run__33"),
 "vcpu.xǁVcpuǁ_complete_pending_io__mutmut_15": (E, "as run__33"),
 "vcpu.xǁVcpuǁsynchronize__mutmut_2": (E, "level names are case-insensitive: 'full' is FULL"),
 "vcpu.xǁVcpuǁflush__mutmut_2": (E, "allow_defer=None is falsy like False"),
 # regfile.py
 "regfile.xǁRegisterFileBaseǁ__getattr____mutmut_7": (E, "difflib.get_close_matches' default n is 3"),
 "regfile.xǁRegisterFileBaseǁ_dump_plan__mutmut_1": (E, "the plan is a cache: rebuilt each call, same plan"),
 "regfile.xǁRegisterFileBaseǁ_dump_plan__mutmut_2": (E, "as _dump_plan__1"),
 "regfile.xǁRegisterFileBaseǁ_dump_plan__mutmut_7": (E, "as _dump_plan__1 (a None entry is rebuilt)"),
}
SIPI = "reached only when KVM_RUN returns for an AP still waiting for SIPI with edits queued; the cache side is tested on the simulator (test_a_run_that_did_not_apply_kvm_dirty_regs_keeps_the_edits), the vCPU side needs an AP stopped before SIPI on one thread: no test yet"
RC0 = "reached only when the completion run returns an exit of its own (rc >= 0, e.g. the next chunk of a split rep ins); on this host (kvm_pvm) it always returns EINTR, so no test here can reach it"
R.update({
 "vcpu.xǁVcpuǁ_complete_pending_io__mutmut_6": (G, RC0),
 "vcpu.xǁVcpuǁ_complete_pending_io__mutmut_7": (G, RC0),
 "vcpu.xǁVcpuǁ_complete_pending_io__mutmut_9": (G, RC0),
 "vcpu.xǁVcpuǁ_complete_pending_io__mutmut_10": (G, RC0),
 "vcpu.xǁVcpuǁ_complete_pending_io__mutmut_11": (G, RC0),
 "vcpu.xǁVcpuǁ_complete_pending_io__mutmut_13": (G, RC0),
 "vcpu.xǁVcpuǁ_complete_pending_io__mutmut_14": (G, RC0),
 "cache.xǁRegisterCacheǁput__mutmut_5": (E, "a queued sync group's local copy is the kvm_run page, which put() overwrites with the new data before KVM_RUN applies it"),
})
for n in range(1, 8):
    R[f"arch.x86_64.transport.xǁKvmTransportǁunconsumed__mutmut_{n}"] = (G, SIPI)
T = "arch.x86_64.transport.xǁKvmTransportǁ"
R.update({
 T + "__init____mutmut_46": (E, "4096 is the fallback only when KVM reports no XSAVE2 size; this host reports one"),
 T + "__init____mutmut_108": (E, "the byte view is only OR-ed with flags < 0x80 at one offset"),
 T + "__init____mutmut_1": (E, "Vcpu always passes has_lapic"),
 T + "fetch__mutmut_13": (E, "unreachable: every catalog group has a fetch path (the line is marked pragma: no cover)"),
})

# --- 2026-12-03 afternoon run (HEAD of /work/main; numbering of the current code) ---------
C = "cache.xǁRegisterCacheǁ"
R.update({
 C + "after_run__mutmut_26": (E, "one=None sends every mask to applied(), which clears one group as well as several"),
 C + "after_run__mutmut_27": (E, "as after_run__26 (the lookup of None misses)"),
 C + "after_run__mutmut_32": (E, "the loop below walks dirty_mask & held either way; an empty mask walks nothing"),
 C + "after_run__mutmut_34": (E, "lays a dirty group's own edits into its local copy; a group not held is fetched before it is read, and _fetch overlays the same edits again"),
})
R.update({
 T + "__init____mutmut_110": (E, "fast_defer_mask only picks cache.flush's no-syscall shortcut; store() queues held REGS/SREGS in kvm_dirty_regs the same way, also without a syscall"),
 T + "__init____mutmut_112": (E, "as __init____mutmut_110 (REGS & SREGS = 0: the shortcut is never taken)"),
 T + "__init____mutmut_124": (E, "_flags_for is looked up only with masks of the sync groups (at most REGS|SREGS|EVENTS = 0b111), far below all_mask - 1"),
 T + "store__mutmut_32": (E, "MSRS precedes MSRS_TIME in FLUSH_ORDER, so the group after an MSR group is never MSRS"),
 T + "store__mutmut_33": (E, "as store__32"),
 T + "store__mutmut_45": (E, "MSRS_LAST keys shift together (2, 3, 4 instead of 1, 2, 3): the same order, the others still first"),
 T + "store__mutmut_48": (E, "other MSRs tie with TSC at key 1; the sort is stable and MSRS (gathered first) precedes MSRS_TIME, the only group holding TSC"),
 T + "store__mutmut_56": (E, "fetched=None is falsy like False"),
 T + "store__mutmut_103": (E, "byte 520 (XCOMP_BV) is 0 in the standard format KVM_GET_XSAVE2 returns: the 9-byte read is the same number"),
 T + "store__mutmut_151": (E, "the KVM_SET_MSRS of both groups is issued while the loop is at the last MSR group, MSRS_TIME when both are dirty, so 'MSRS' only matters when MSRS alone is dirty, where failed = msr_groups = [MSRS] either way"),
 T + "_store_lapic__mutmut_33": (E, "the byte after SVR (0xF4) is reserved, 0 in KVM's page: bit 8 reads the same"),
 T + "_store_lapic__mutmut_62": (E, "as _store_lapic__33"),
 T + "_store_lapic__mutmut_80": (E, "the byte after each LVT is reserved, 0 in KVM's page: the same value"),
 T + "detach__mutmut_9": (E, "use_sync_regs=None is falsy like False"),
 T + "detach__mutmut_14": (E, "after detach fast_defer_mask is 0 and run() refuses a closed vCPU, so defer() (the only user of _page) is never called"),
 T + "put__mutmut_1": (E, "the cache always passes defer (cache.put is put's one caller)"),
 T + "put__mutmut_26": (E, "as store__45: MSRS_LAST keys shift together"),
 T + "put__mutmut_65": (G, "drops the saved bytes' other valid-flags: on this host the only other one KVM reports is SMM, and it refuses SMM state (KVM_SET_VCPU_EVENTS with smi.pending: EINVAL), so no test here can see it"),
})
KVM_ALL_OR_NONE = ("kvm_dirty_regs bits are set only for queued groups, and KVM applies all of them or none "
                   "(sync_regs runs once, before entry; a refusal fails KVM_RUN instead), so the mask and "
                   "the flags left agree")
R.update({
 T + "unconsumed__mutmut_5": (E, KVM_ALL_OR_NONE),
 T + "unconsumed__mutmut_6": (E, KVM_ALL_OR_NONE),
 T + "unconsumed__mutmut_7": (E, KVM_ALL_OR_NONE),
})
for n in range(1, 8):
    if R.get(f"{T}unconsumed__mutmut_{n}", (None,))[1:] == (SIPI,):
        del R[f"{T}unconsumed__mutmut_{n}"]

V = "vcpu.xǁVcpuǁ"
R.update({
 V + "__init____mutmut_1": (E, "Machine.add_vcpu always passes strategy: the default is unreachable"),
 V + "__init____mutmut_2": (E, "as __init____mutmut_1"),
 V + "__init____mutmut_3": (E, "Machine always passes use_sync_regs"),
 V + "__init____mutmut_4": (E, "Machine always passes has_lapic"),
 V + "__init____mutmut_28": (E, "_plain_cache only picks run()'s inlined flush; before_run() flushes the same"),
 V + "__init____mutmut_42": (E, "the u64 words of the page are only compared with each other (serving's I/O-exit key): signedness changes no comparison"),
 V + "run__mutmut_3": (E, "the owner test is repeated inside _check_thread()"),
 V + "run__mutmut_20": (G, RC0),
 V + "run__mutmut_25": (E, "the inlined no-syscall path is never taken; before_run() -> cache.flush() queues the same groups the same way"),
 V + "run__mutmut_31": (E, "transport.deferred is read only when KVM_RUN fails (run_failed, take_back_deferred), where in_flight names the same groups and decides"),
 V + "run__mutmut_39": (E, "before_run() with nothing dirty and nothing fetched does nothing"),
 V + "run__mutmut_41": (G, "needs a KVM_RUN that fails with an errno other than EINVAL while writes are queued (EFAULT, ENOMEM): no test makes one"),
 V + "run__mutmut_46": (E, "unconsumed() returns 0 when kvm_dirty_regs is 0; the test only skips the call"),
 V + "run__mutmut_48": (E, "reached only with kvm_dirty_regs clear and edits dirty after a run; run() flushes every edit before KVM_RUN, so none is dirty then"),
 V + "run__mutmut_62": (E, "the lookup of None misses: applied() clears the one group as well"),
 V + "run__mutmut_75": (E, "the decoded-exit cache always misses: every I/O exit is decoded afresh into the same immutable value"),
 V + "run__mutmut_83": (E, "run() calls decode() here only for exits other than port I/O, for which decode() reads neither the page address nor the byte view"),
 V + "run__mutmut_86": (E, "as run__83"),
 V + "run__mutmut_87": (E, "as run__83"),
 V + "_new_io_exit__mutmut_6": (E, "the bound of the decoded-exit cache moves by one entry"),
 V + "_new_io_exit__mutmut_7": (E, "as _new_io_exit__6"),
 V + "_new_io_exit__mutmut_8": (E, "a cached None makes run() decode the exit again: the same value"),
 V + "_new_io_exit__mutmut_12": (E, "the exit is cached under another key, so lookups miss and decode again: the same value"),
 V + "close__mutmut_2": (E, "_run_words is read only by serving._turns, after serve() has checked _run_view is None"),
})
R[T + "unconsumed__mutmut_3"] = (E, "run() and serve() call unconsumed() only when kvm_dirty_regs is non-zero, so the early return is never taken")
MRF = "regfile.x_make_register_file__mutmut_"
R.update({
 MRF + "4": (E, "without __slots__ the class gains a __dict__ nothing can write: RegisterFileBase.__setattr__ refuses every name that is not a register"),
 MRF + "52": (E, "nothing reads the class's _refusals (each _RefusedAttr carries its reason): dead"),
 MRF + "53": (E, "as make_register_file__52"),
 MRF + "54": (E, "as make_register_file__52"),
})

# --- re-numbered after the hot-path commits (cache.__init__, after_run; _store_lapic) ------
for _k in ("cache.xǁRegisterCacheǁ__init____mutmut_23", C + "after_run__mutmut_26", C + "after_run__mutmut_27",
           C + "after_run__mutmut_32", C + "after_run__mutmut_34", C + "after_run__mutmut_3",
           T + "_store_lapic__mutmut_33", T + "_store_lapic__mutmut_62", T + "_store_lapic__mutmut_80"):
    R.pop(_k, None)
ONE_GROUP = ("after_run() sees queued writes applied only for one group: run() and serve() take every "
             "run that applied its queued writes inline, the runs that reach after_run() applied none "
             "(an AP waiting for SIPI; _complete_pending_io takes queued writes back first), and the "
             "simulator has one sync group")
R.update({
 "cache.xǁRegisterCacheǁ__init____mutmut_27": (E, "plain_writes only picks regfile's inlined copy of write(); None takes write() itself, same effect"),
 C + "after_run__mutmut_20": (E, "one=None sends every mask to applied(), which clears one group as well as several"),
 C + "after_run__mutmut_21": (E, "as after_run__20 (the lookup of None misses)"),
 C + "after_run__mutmut_22": (E, ONE_GROUP),
 C + "after_run__mutmut_23": (E, ONE_GROUP),
 C + "after_run__mutmut_28": (E, "lays a dirty group's own edits into its local copy; a group not held is fetched before it is read, and _fetch overlays the same edits again"),
 T + "_store_lapic__mutmut_47": (E, "the byte after SVR (0xF4) is reserved, 0 in KVM's page: bit 8 reads the same"),
 T + "_store_lapic__mutmut_69": (E, "the byte after each LVT is reserved, 0 in KVM's page: the same value"),
 V + "run__mutmut_79": (E, "looks up a key no exit is stored under (offset 0 of the page): every I/O exit is decoded afresh, the same value"),
 V + "__init____mutmut_30": (G, "swaps the inlined flush between the plain cache and the comparison strategies; the plain cache's before_run() queues the same, and no test pins what a strategy's before_run() adds per run on real KVM"),
})
R.update({
 C + "after_run__mutmut_3": (E, "after_run() gets unapplied groups only from a run that returned before applying them; nothing else is dirty then (run() flushed every edit first), so = and |= agree"),
 C + "after_run__mutmut_26": (E, "the loop below walks dirty_mask & held either way; an empty mask walks nothing"),
 "cache.xǁRegisterCacheǁsynchronize__mutmut_22": (E, "`not held | bit` is always false: the volatile clause alone picks groups here, and an unheld group skipped is fetched by the second loop (mask & ~held)"),
 T + "store__mutmut_33": (E, "MSRS precedes MSRS_TIME in FLUSH_ORDER, so the group after an MSR group is never MSRS"),
 "vcpu.xǁVcpuǁ_complete_pending_io__mutmut_12": (E, "decode() reads the same fields with or without the byte view (through the view, or through ctypes)"),
 "vcpu.xǁVcpuǁ_complete_pending_io__mutmut_15": (E, "as _complete_pending_io__12"),
})
