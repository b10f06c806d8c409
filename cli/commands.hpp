#pragma once
// Each subcommand lives in its own file and registers itself on the program's CLI11 app.
// A command's callback returns through the exit status: 0 success, 1 bad input (InputError,
// thrown and caught in main), 2 usage errors (CLI11 parse errors).
#include <CLI/CLI.hpp>

namespace mop::cli {

void add_model_command(CLI::App& app);
void add_hw_command(CLI::App& app);
void add_memory_command(CLI::App& app);
void add_simulate_command(CLI::App& app);
void add_plan_command(CLI::App& app);
void add_sweep_command(CLI::App& app);
void add_fit_command(CLI::App& app);
void add_validate_command(CLI::App& app);
void add_claims_command(CLI::App& app);
void add_run_command(CLI::App& app);
void add_calibrate_command(CLI::App& app);
void add_report_command(CLI::App& app);

} // namespace mop::cli
