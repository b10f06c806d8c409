#pragma once
#include "strategies/direct_ok.hpp"
#include "traces/trace.hpp"
