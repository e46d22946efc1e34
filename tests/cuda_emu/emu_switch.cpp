// The emulator's context switch on x86-64 (gg_emu.h): push the callee-saved registers, save the stack pointer in
// *save_sp (rdi), load load_sp (rsi), pop the other context's registers and return into it.
#if defined(__x86_64__)
asm(R"(
    .text
    .globl gg_emu_switch
    .type gg_emu_switch, @function
gg_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size gg_emu_switch, .-gg_emu_switch
    .section .note.GNU-stack,"",@progbits
    .text
)");
#endif
