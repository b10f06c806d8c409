#pragma once
// The one place mop opens a path the user gave: every input file is read by read_input_file and
// every output file is written by write_output_file (docs/ARCHITECTURE.md, "Files mop reads and
// writes"). Every refusal is an InputError naming the path and what it is.
#include <string>
#include <string_view>

namespace mop {

// The whole content of the regular file at `path` (a symbolic link to one is fine). A missing
// file, a folder, a FIFO, a device, a socket, a file larger than limits::max_input_file_bytes
// and a read error are refused. The file is opened without blocking (a FIFO with no writer
// cannot hang the program) and at most the limit is read even if the file grows meanwhile.
std::string read_input_file(const std::string& path);

// Writes `text` to `path`, following what is there:
// - nothing or a regular file: a temporary file in the same folder (".NAME.mop-tmp-..."),
//   written, flushed to disk and renamed over the target, so that the target is either the
//   whole new text or untouched; on any failure the temporary file is removed. Where the
//   filesystem supports O_TMPFILE the temporary file has no name until it is complete, so a
//   killed process leaves nothing behind. A replaced file keeps its permissions.
// - a symbolic link: the rule applies to what it points to; the link stays.
// - a FIFO or a character device: the text is written through it (a FIFO without a reader is
//   refused rather than waited on).
// - a folder, a block device or a socket: refused.
void write_output_file(const std::string& path, std::string_view text);

// Refuses, before any work is done, an output path that write_output_file would refuse without
// writing: a missing folder, a folder, a block device, a socket, a folder that cannot be written.
void check_output_path(const std::string& path);

} // namespace mop
