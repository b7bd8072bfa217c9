#include "sigbus_guard.h"

#include <signal.h>

#include <mutex>

namespace pyconv {

namespace {

thread_local SigbusFrame* tl_frame = nullptr;
struct sigaction g_previous;
std::mutex g_install_mutex;

void on_sigbus(int sig, siginfo_t* info, void* context) {
  SigbusFrame* frame = tl_frame;
  if (frame != nullptr) {
    frame->address = info->si_addr;
    siglongjmp(frame->env, 1);  // SA_NODEFER: SIGBUS is not left blocked
  }
  if (g_previous.sa_flags & SA_SIGINFO) {
    if (g_previous.sa_sigaction != nullptr) {
      g_previous.sa_sigaction(sig, info, context);
      return;
    }
  } else if (g_previous.sa_handler != SIG_DFL && g_previous.sa_handler != SIG_IGN) {
    g_previous.sa_handler(sig);
    return;
  }
  ::signal(SIGBUS, SIG_DFL);  // returning re-runs the faulting read, which now kills the process
}

}  // namespace

void install_sigbus_handler() {
  std::lock_guard<std::mutex> lock(g_install_mutex);
  struct sigaction current;
  if (::sigaction(SIGBUS, nullptr, &current) != 0) return;
  if ((current.sa_flags & SA_SIGINFO) && current.sa_sigaction == &on_sigbus) return;
  struct sigaction ours = {};
  ours.sa_sigaction = &on_sigbus;
  ours.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
  sigemptyset(&ours.sa_mask);
  g_previous = current;
  ::sigaction(SIGBUS, &ours, nullptr);
}

void enter_sigbus_frame(SigbusFrame* frame) {
  frame->previous = tl_frame;
  tl_frame = frame;
}

void leave_sigbus_frame(SigbusFrame* frame) { tl_frame = frame->previous; }

}  // namespace pyconv
