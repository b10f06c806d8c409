#pragma once
#include "sim/result.hpp"
