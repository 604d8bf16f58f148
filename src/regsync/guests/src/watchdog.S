# watchdog -- arms the VMM watchdog (100 ms) and pets it.
#
# Argument = number of pets (0 = default 20). Each pet follows a short busy
# loop with TICKS_PER_PET tick exits (port 0x501); then WATCHDOG_DISARM,
# "watchdog: petted 0x<hex> times\n", exit 0.
# Argument 0xFFFF: arm, print "watchdog: not petting\n", then spin with tick
# exits forever (the watchdog fires).
        .include "common.inc"

        .set DEFAULT_PETS, 20
        .set NEVER_PET, 0xffff
        .set TIMEOUT_MS, 100
        .set TICKS_PER_PET, 3
        .set BUSY_LOOPS, 200            # per tick; CPL0 code is emulated here

        .bss
        .balign 8
        .globl wd_pets_done
wd_pets_done:   .quad 0

        .text
        .globl main
main:
        ARG_OR DEFAULT_PETS
        mov $TIMEOUT_MS, %edi
        xor %esi, %esi
        HYPERCALL HC_WATCHDOG_ARM
        cmp $NEVER_PET, %rbp
        je never
        xor %ebx, %ebx
        test %rbp, %rbp
        jz 4f
        .globl wd_loop
wd_loop:
        mov $TICKS_PER_PET, %r12d
2:      mov $BUSY_LOOPS, %ecx
3:      pause
        dec %ecx
        jnz 3b
        TICK
        dec %r12d
        jnz 2b
        .globl wd_pet
wd_pet:
        HYPERCALL HC_WATCHDOG_PET
        inc %rbx
        mov %rbx, wd_pets_done
        cmp %rbp, %rbx
        jb wd_loop
4:      HYPERCALL HC_WATCHDOG_DISARM
        PRINT "watchdog: petted 0x"
        mov %rbx, %rax
        call put_hex
        PRINT " times\n"
        xor %eax, %eax
        ret

never:  PRINT "watchdog: not petting\n"
        .globl wd_starve
wd_starve:
        mov $BUSY_LOOPS, %ecx
1:      pause
        dec %ecx
        jnz 1b
        TICK
        jmp wd_starve

        .section .note.GNU-stack, "", @progbits
