# smp -- start every AP, meet, IPI handshake.
#
# The BSP prints "cpu 0 online\n" and starts the APs (LAPIC ids 1..n-1, n =
# vCPUs from the boot info; 1 under QEMU) one at a time with INIT-SIPI-SIPI;
# each AP enters through the real-mode trampoline at 0x8000 and prints
# "cpu N online\n" (N = its LAPIC id) before the next one is started, so the
# output is in id order. Each AP then increments smp_arrived and halts with
# interrupts on (sti; hlt) until its IPI (vector 0x41) arrives; the handler
# sets ipi_seen[id], the AP sets ap_done[id] and parks (cli; hlt). The BSP
# waits for all arrivals, sends the IPI to each AP in turn and waits for its
# ap_done, then prints "smp: all N cpus done\n" and exits 0 (N in decimal).
# An AP that does not start / arrive / finish ends it with a message and
# exit 3.
        .set GUEST_SMP, 1
        .include "common.inc"

        .bss
        .balign 8
        .globl smp_arrived, ipi_seen, ap_done
smp_arrived:    .quad 0
ipi_seen:       .space MAX_CPUS         # one byte per LAPIC id
ap_done:        .space MAX_CPUS

        .text
        .globl main
main:
        call lapic_enable
        mov $VEC_IPI, %ecx
        mov $ipi_isr, %eax
        call set_gate
        call lapic_id
        call say_online
        mov boot_ncpus, %rbp
        cmp $1, %rbp
        jbe 8f
        call start_aps
        lea -1(%rbp), %r12              # wait for n-1 arrivals
        mov $WAIT_LOOPS, %ecx
1:      cmp smp_arrived, %r12
        jbe 2f
        pause
        dec %ecx
        jnz 1b
        mov $smp_arrived, %eax
        jmp timeout
2:      mov $1, %ebx                    # IPI each AP in turn
3:      mov %ebx, %edi
        mov $(0x4000 | VEC_IPI), %esi   # fixed, assert
        call lapic_send_ipi
        mov $WAIT_LOOPS, %ecx
4:      cmpb $0, ap_done(%rbx)
        jne 5f
        pause
        dec %ecx
        jnz 4b
        mov $ap_done, %eax
        jmp timeout
5:      inc %ebx
        cmp %rbp, %rbx
        jb 3b
8:      call serial_lock
        PRINT "smp: all "
        mov %rbp, %rax
        call put_dec
        PRINT " cpus done\n"
        call serial_unlock
        xor %eax, %eax
        ret

timeout:                                # %eax = what we waited for
        call serial_lock
        cmp $smp_arrived, %eax
        jne 1f
        PRINT "smp: only "
        mov smp_arrived, %rax
        call put_dec
        PRINT " APs arrived\n"
        jmp 2f
1:      PRINT "smp: cpu "
        mov %rbx, %rax
        call put_dec
        PRINT " did not take its IPI\n"
2:      mov $EXIT_AP_TIMEOUT, %eax
        jmp exit

say_online:                             # %eax = LAPIC id
        call serial_lock
        PRINT "cpu "
        call put_dec
        PRINT " online\n"
        jmp serial_unlock

        .globl ap_main
ap_main:                                # %edi = LAPIC id
        mov %edi, %ebx
        call lapic_enable
        mov %ebx, %eax
        call say_online
        call ap_signal_online
        lock incq smp_arrived
        .globl ap_wait_ipi
ap_wait_ipi:
        cli
        cmpb $0, ipi_seen(%rbx)
        jne 1f
        sti
        hlt
        jmp ap_wait_ipi
1:      movb $1, ap_done(%rbx)
        ret                             # -> ap_park

        .globl ipi_isr
ipi_isr:
        push %rax
        mov $LAPIC, %eax
        mov LAPIC_ID(%rax), %eax
        shr $24, %eax
        movb $1, ipi_seen(%rax)
        mov $LAPIC, %eax
        movl $0, LAPIC_EOI(%rax)
        pop %rax
        iretq

        .section .note.GNU-stack, "", @progbits
