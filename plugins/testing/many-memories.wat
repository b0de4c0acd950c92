;; Test component `many-memories`: 16 core instances, each with its own
;; linear memory of 31 MiB. The host must refuse it when it is loaded (more
;; memories than one plugin may hold), and never let 16 x 31 MiB run under a
;; 32 MiB memory limit.
(component
  (core module $m
    (memory 496))
  (core instance $i0 (instantiate $m))
  (core instance $i1 (instantiate $m))
  (core instance $i2 (instantiate $m))
  (core instance $i3 (instantiate $m))
  (core instance $i4 (instantiate $m))
  (core instance $i5 (instantiate $m))
  (core instance $i6 (instantiate $m))
  (core instance $i7 (instantiate $m))
  (core instance $i8 (instantiate $m))
  (core instance $i9 (instantiate $m))
  (core instance $i10 (instantiate $m))
  (core instance $i11 (instantiate $m))
  (core instance $i12 (instantiate $m))
  (core instance $i13 (instantiate $m))
  (core instance $i14 (instantiate $m))
  (core instance $i15 (instantiate $m))
)
