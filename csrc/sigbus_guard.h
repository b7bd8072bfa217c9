// Reads of a mapped source fault with SIGBUS when the file shrinks under the mapping (another
// process truncates or rewrites it). A guard turns that fault, on the thread that reads, into a
// C++ exception instead of a dead process: the handler jumps back to the guarded function, which
// throws. Code run under a guard must own no objects with destructors (it is left by
// siglongjmp); the executor guards only its loops that read mappings into buffers.
//
//   SigbusFrame frame;
//   if (sigsetjmp(frame.env, 0) != 0) { leave_sigbus_frame(&frame); throw ...(frame.address); }
//   enter_sigbus_frame(&frame);
//   try { read(); } catch (...) { leave_sigbus_frame(&frame); throw; }
//   leave_sigbus_frame(&frame);
#pragma once
#include <csetjmp>

namespace pyconv {

struct SigbusFrame {
  sigjmp_buf env;
  const void* address = nullptr;  // where the read faulted
  SigbusFrame* previous = nullptr;
};

// Installs the handler (once, and again if something replaced it); a fault outside any guard
// goes to whatever handled SIGBUS before (Python's faulthandler, or the default: the process dies).
void install_sigbus_handler();
void enter_sigbus_frame(SigbusFrame* frame);
void leave_sigbus_frame(SigbusFrame* frame);

}  // namespace pyconv
