"""What a process needs from its machine: devices and precision, kernels, quantized
loading, process trees and the watchdog. Imports only the adapter core (seedlora)."""
