// mop report end to end: one self-contained page (nothing to fetch), rendered by headless
// Chromium into a screenshot where Chromium is installed (.ci/run installs it).
#include "tests/cli/run_mop.hpp"

#include <cstdlib>
#include <doctest/doctest.h>
#include <filesystem>
#include <fstream>

namespace cli_report_test {

using mop::test::run_mop;
using mop::test::slurp;

TEST_CASE("mop report writes one self-contained page that headless Chromium renders" *
          doctest::test_suite("plumbing")) {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / ("mop-report-" + std::to_string(::getpid()));
  fs::create_directories(dir);
  const fs::path html = dir / "report.html";
  const auto r = run_mop("report --model tiny-moe --cluster h100 --nodes 1 --seq 1K --plan "
                         "megatron --sweep 1K -o " +
                         html.string());
  REQUIRE(r.status == 0);
  CHECK(r.out.empty());
  const std::string page = slurp(html);
  CHECK(page.starts_with("<!DOCTYPE html>"));
  CHECK(page.find("</html>") != std::string::npos);
  for (const char* part : {"Memory per rank class", "Where the time goes", "Timeline",
                           "Across context lengths", "Launch", "<svg", "pretrain_gpt.py"})
    CHECK_MESSAGE(page.find(part) != std::string::npos, part);
  // Nothing to fetch: no scripts, no links, no external resources of any kind.
  for (const char* fetch :
       {"<script", "<link", "src=", "href=", "url(", "@import", "http:", "https:"})
    CHECK_MESSAGE(page.find(fetch) == std::string::npos, fetch);
  if (std::system("command -v chromium >/dev/null 2>&1") != 0) {
    MESSAGE("chromium is not installed: the page is not rendered here (.ci/run installs it)");
  } else {
    const fs::path png = dir / "report.png";
    // Every host name resolves to nothing: the page renders offline or not at all.
    const std::string cmd =
        "timeout 120 chromium --headless --no-sandbox --disable-gpu --disable-dev-shm-usage "
        "--hide-scrollbars --window-size=1200,1600 "
        "--host-resolver-rules='MAP * ~NOTFOUND' --screenshot=" +
        png.string() + " file://" + html.string() + " >/dev/null 2>&1";
    CHECK(std::system(cmd.c_str()) == 0);
    REQUIRE(fs::exists(png));
    CHECK(fs::file_size(png) > 10000); // a page with content, not a blank one
    std::ifstream in(png, std::ios::binary);
    char signature[8] = {};
    in.read(signature, 8);
    CHECK(std::string(signature + 1, 3) == "PNG");
  }
  fs::remove_all(dir);
}

} // namespace cli_report_test
