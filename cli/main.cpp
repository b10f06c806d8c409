// mop: predicts, explores and runs parallelism mixes for training Mixture-of-Experts models.
#include "cli/commands.hpp"
#include "cli/output.hpp"
#include "common/allocator.hpp"
#include "common/error.hpp"
#include "common/limits.hpp"

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <exception>
#include <fmt/format.h>
#include <iostream>
#include <new>

namespace {

// A message built from what the user typed (a command name, CLI11's sentence quoting an
// argument) stays on one line of bounded length, as InputError's own sentences do.
std::string one_line(std::string_view text) {
  return mop::quote_for_message(text, 1000);
}

// Everything printed on stdout went through its buffer; a write that failed on the way (a full
// disk, a closed terminal) must not end in exit 0 with a truncated output.
int finish(int status) {
  errno = 0;
  const bool flushed = std::fflush(stdout) == 0;
  const int err = errno;
  if (flushed && !std::ferror(stdout) && !std::cout.bad())
    return status;
  std::fputs(fmt::format("mop: cannot write the output to stdout ({}).\n",
                         err != 0 ? std::strerror(err) : "a write failed")
                 .c_str(),
             stderr);
  return status == 0 ? 1 : status;
}

} // namespace

int main(int argc, char** argv) {
  mop::keep_freed_memory();
  CLI::App app{"mop: does this Mixture-of-Experts model train on this cluster, how fast, and with "
               "which mix of parallelisms?\n\nExample:\n  mop model show kimi-k2 --seq 128K"};
  app.name("mop");
  app.require_subcommand(1);
  app.set_version_flag("--version", "mop 0.1.0");
  mop::cli::add_model_command(app);
  mop::cli::add_hw_command(app);
  mop::cli::add_memory_command(app);
  mop::cli::add_simulate_command(app);
  mop::cli::add_plan_command(app);
  mop::cli::add_sweep_command(app);
  mop::cli::add_fit_command(app);
  mop::cli::add_validate_command(app);
  mop::cli::add_claims_command(app);
  mop::cli::add_run_command(app);
  mop::cli::add_calibrate_command(app);
  mop::cli::add_report_command(app);
  // CLI11 answers --help before it notices an unknown command ("mop nosuch --help" would exit
  // 0): refuse unknown commands first, so that exit 0 from --help means the command exists.
  if (argc > 1 && argv[1][0] != '-') {
    bool known = false;
    for (const CLI::App* sub : app.get_subcommands({}))
      known |= sub->get_name() == argv[1];
    if (!known) {
      std::fputs(fmt::format("mop: unknown command '{}' (see --help)\n",
                             mop::quote_for_message(argv[1], mop::limits::max_quoted_chars))
                     .c_str(),
                 stderr);
      return 2;
    }
  }
  try {
    app.parse(argc, argv);
    mop::cli::commit_output(); // -o FILE: what the command printed, whole
  } catch (const CLI::CallForHelp&) {
    mop::cli::discard_output();
    std::fputs(app.help().c_str(), stdout);
    return finish(0);
  } catch (const CLI::CallForAllHelp&) {
    mop::cli::discard_output();
    std::fputs(app.help("", CLI::AppFormatMode::All).c_str(), stdout);
    return finish(0);
  } catch (const CLI::CallForVersion& e) {
    mop::cli::discard_output();
    std::fputs((std::string(e.what()) + "\n").c_str(), stdout);
    return finish(0);
  } catch (const CLI::ParseError& e) {
    mop::cli::discard_output();
    // Usage errors: one sentence and a pointer to --help, exit 2 (CLI.md).
    std::fputs(fmt::format("mop: {} (see --help)\n", one_line(e.what())).c_str(), stderr);
    return 2;
  } catch (const mop::InputError& e) {
    mop::cli::discard_output();
    std::fputs(fmt::format("mop: {}\n", e.what()).c_str(), stderr);
    return 1;
  } catch (const std::bad_alloc&) {
    mop::cli::discard_output();
    // A last resort: the ceilings of common/limits.hpp keep every input's work far below any
    // machine's memory, so reaching here means an input still asked for more than it has.
    std::fputs("mop: out of memory while running this command; the inputs ask for more memory "
               "than this machine has.\n",
               stderr);
    return 1;
  } catch (const std::exception& e) {
    mop::cli::discard_output();
    std::fputs(fmt::format("mop: internal error: {}\n", one_line(e.what())).c_str(), stderr);
    return 3;
  }
  return finish(0);
}
