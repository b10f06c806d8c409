#pragma once
#include "sim/engine.hpp"
