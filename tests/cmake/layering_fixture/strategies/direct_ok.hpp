#pragma once
#include "sim/schedule.hpp"
