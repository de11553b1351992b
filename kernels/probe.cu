// The start-up check of programmatic dependent launch (host/src/model/cuda/dependent_launch.rs):
// the writer lets the next kernel be scheduled at once (grid_dependency_sync), then sleeps
// about `sleep_us` microseconds before it writes `value` to *cell; the reader, launched right
// after it, copies *cell to *out once its grid_dependency_sync returns. A wait that did not
// wait for the writer would copy what *cell held before. One thread each.

extern "C" __global__ void dependency_probe_write(int* cell, int value, int sleep_us) {
    grid_dependency_sync();
    for (int i = 0; i < sleep_us; i++) __nanosleep(1000);
    *cell = value;
}

extern "C" __global__ void dependency_probe_read(const int* cell, int* out) {
    grid_dependency_sync();
    *out = *cell;
}
