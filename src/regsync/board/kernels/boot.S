/* Multiboot v1 entry shared by the conformance kernels.
 *
 * The loader (QEMU's, or regsync's) enters _start in 32-bit protected mode with
 * paging off, flat segments, EAX = 0x2BADB002 and EBX = the multiboot info
 * (Multiboot Specification 0.6.96, section 3.2 "Machine state").
 * kmain(magic, info) returns the exit code written to isa-debug-exit.
 *
 * With AOUT_KLUDGE defined the header also carries the load addresses (flags
 * bit 16), so the same kernel boots as a flat binary (objcopy -O binary).
 */
#define MB_MAGIC 0x1BADB002
#ifdef AOUT_KLUDGE
#define MB_FLAGS 0x00010003     /* page align, memory info, address fields valid */
#else
#define MB_FLAGS 0x00000003     /* page align, memory info */
#endif

    .section .multiboot, "a"
    .align 4
mb_header:
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)
#ifdef AOUT_KLUDGE
    .long mb_header             /* header_addr */
    .long __image_start         /* load_addr */
    .long __load_end            /* load_end_addr */
    .long __bss_end             /* bss_end_addr */
    .long _start                /* entry_addr */
#endif

    .text
    .globl _start
_start:
    cli
    mov $boot_stack_top, %esp
    push %ebx
    push %eax
    call kmain
    push %eax
    call exit_code
1:  cli
    hlt
    jmp 1b

    .bss
    .align 16
    .globl boot_stack_top
boot_stack:
    .skip 16384
boot_stack_top:

/* 256 interrupt stubs: push the vector, save registers, call irq_handler(vector).
 * Then, instead of iret (which this host's KVM emulator cannot run for 32-bit code
 * at CPL0), unwind to the last irq_catch() with interrupts still disabled, like
 * longjmp: irq_catch() returns the vector there. Exceptions with an error code
 * are not expected (a fault ends the test). */
    .text
    .align 16
irq_common:
    pusha
    mov 32(%esp), %eax
    push %eax
    call irq_handler
    add $4, %esp
    popa
    mov (%esp), %eax
    mov catch_esp, %esp
    mov catch_ebx, %ebx
    mov catch_esi, %esi
    mov catch_edi, %edi
    mov catch_ebp, %ebp
    jmp *catch_eip

/* u32 irq_catch(void): 0 when called; the vector when an interrupt unwinds here. */
    .globl irq_catch
irq_catch:
    mov (%esp), %eax
    mov %eax, catch_eip
    lea 4(%esp), %eax
    mov %eax, catch_esp
    mov %ebx, catch_ebx
    mov %esi, catch_esi
    mov %edi, catch_edi
    mov %ebp, catch_ebp
    xor %eax, %eax
    ret

    .bss
    .align 4
catch_eip: .long 0
catch_esp: .long 0
catch_ebx: .long 0
catch_esi: .long 0
catch_edi: .long 0
catch_ebp: .long 0

    .text
    .macro irq_stub n
irq_stub_\n:
    push $\n
    jmp irq_common
    .endm
    .macro irq_stub_addr n
    .long irq_stub_\n
    .endm
    .altmacro

    .set i, 0
    .rept 256
    irq_stub %i
    .set i, i + 1
    .endr

    .section .rodata
    .align 4
    .globl irq_stubs
irq_stubs:
    .set i, 0
    .rept 256
    irq_stub_addr %i
    .set i, i + 1
    .endr
