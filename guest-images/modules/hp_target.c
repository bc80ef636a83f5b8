// SPDX-License-Identifier: GPL-2.0
/*
 * hyperpatch test module: functions for hyperpatch's own tests to patch.
 *
 *   /proc/hp_target  prints hp_target_message()
 *   /proc/hp_sleep   a read sleeps inside hp_sleep_wait() until /proc/hp_wake
 *                    is written, then prints "woke <hp_target_message()>"
 *   /proc/hp_bench   write N: calls hp_bench_target() N times, timing it with
 *                    the TSC (and an empty loop as the baseline); read:
 *                    "N cycles_target cycles_baseline"
 *   /proc/hp_many    prints the sum of hp_f01()..hp_f20()
 *   /proc/hp_spawn   write N: starts N more kernel threads that sleep until
 *                    the module goes (scale tests); read: how many run
 *   /proc/hp_racer   write "start": a kernel thread "hp_racer" that sleeps
 *                    outside every patched function; "enter": it wakes and
 *                    calls hp_sleep_wait(); "fork": a new kernel thread
 *                    "hp_forked" calls hp_sleep_wait() (both until
 *                    /proc/hp_wake). Drives a task into a changed function
 *                    at a moment the test chooses. "block N": N more kernel
 *                    threads "hp_blocked/K" sleep inside hp_block_wait()
 *                    until "unblock" (all of them leave it at once).
 */
#include <linux/module.h>
#include <linux/proc_fs.h>
#include <linux/seq_file.h>
#include <linux/uaccess.h>
#include <linux/wait.h>
#include <linux/sched.h>
#include <linux/timex.h>
#include <linux/kthread.h>
#include <linux/vmalloc.h>
#include <linux/string.h>

static DECLARE_WAIT_QUEUE_HEAD(hp_wq);
static int hp_woken;

noinline const char *hp_target_message(void)
{
	return "original";
}

noinline int hp_sleep_wait(void)
{
	int ret = wait_event_interruptible(hp_wq, hp_woken);

	hp_woken = 0;
	return ret;
}

noinline int hp_bench_target(int x)
{
	barrier();
	return x + 1;
}

#define HP_F(n) noinline int hp_f##n(void) { barrier(); return 1; }
HP_F(01) HP_F(02) HP_F(03) HP_F(04) HP_F(05) HP_F(06) HP_F(07) HP_F(08) HP_F(09) HP_F(10)
HP_F(11) HP_F(12) HP_F(13) HP_F(14) HP_F(15) HP_F(16) HP_F(17) HP_F(18) HP_F(19) HP_F(20)

static int hp_target_show(struct seq_file *m, void *v)
{
	seq_printf(m, "%s\n", hp_target_message());
	return 0;
}

static int hp_sleep_show(struct seq_file *m, void *v)
{
	int ret = hp_sleep_wait();

	seq_printf(m, "woke %d %s\n", ret, hp_target_message());
	return 0;
}

static ssize_t hp_wake_write(struct file *f, const char __user *buf, size_t n, loff_t *off)
{
	hp_woken = 1;
	wake_up_interruptible(&hp_wq);
	return n;
}

static unsigned long hp_bench_n;
static u64 hp_bench_target_cycles, hp_bench_base_cycles;

static ssize_t hp_bench_write(struct file *f, const char __user *buf, size_t n, loff_t *off)
{
	unsigned long count, i;
	cycles_t t0, t1, t2;
	int acc = 0;

	if (kstrtoul_from_user(buf, n, 10, &count))
		return -EINVAL;
	t0 = get_cycles();
	for (i = 0; i < count; i++) {
		acc += 1;
		barrier();
	}
	t1 = get_cycles();
	for (i = 0; i < count; i++)
		acc = hp_bench_target(acc);
	t2 = get_cycles();
	hp_bench_n = count;
	hp_bench_base_cycles = t1 - t0;
	hp_bench_target_cycles = t2 - t1;
	return acc ? n : n;
}

static int hp_bench_show(struct seq_file *m, void *v)
{
	seq_printf(m, "%lu %llu %llu\n", hp_bench_n, hp_bench_target_cycles, hp_bench_base_cycles);
	return 0;
}

static int hp_many_show(struct seq_file *m, void *v)
{
	seq_printf(m, "%d\n", hp_f01() + hp_f02() + hp_f03() + hp_f04() + hp_f05() + hp_f06() + hp_f07() +
		   hp_f08() + hp_f09() + hp_f10() + hp_f11() + hp_f12() + hp_f13() + hp_f14() + hp_f15() +
		   hp_f16() + hp_f17() + hp_f18() + hp_f19() + hp_f20());
	return 0;
}

#define HP_SPAWN_MAX 10000
static DECLARE_WAIT_QUEUE_HEAD(hp_spawn_wq);
static struct task_struct **hp_spawned;
static int hp_nr_spawned;

static int hp_sleeper(void *data)
{
	while (!kthread_should_stop())
		wait_event_interruptible(hp_spawn_wq, kthread_should_stop());
	return 0;
}

static ssize_t hp_spawn_write(struct file *f, const char __user *buf, size_t n, loff_t *off)
{
	unsigned int count, i;
	struct task_struct *t;

	if (kstrtouint_from_user(buf, n, 10, &count))
		return -EINVAL;
	if (count > HP_SPAWN_MAX - hp_nr_spawned)
		return -ENOSPC;
	for (i = 0; i < count; i++) {
		t = kthread_run(hp_sleeper, NULL, "hp_sleeper/%d", hp_nr_spawned);
		if (IS_ERR(t))
			return PTR_ERR(t);
		hp_spawned[hp_nr_spawned++] = t;
	}
	return n;
}

static int hp_spawn_show(struct seq_file *m, void *v)
{
	seq_printf(m, "%d\n", hp_nr_spawned);
	return 0;
}

static DECLARE_WAIT_QUEUE_HEAD(hp_racer_wq);
static int hp_racer_go;
static struct task_struct *hp_racer, *hp_forked;

/* Sleeps in its own wait (no patched function on its stack) until "enter". */
static int hp_racer_fn(void *data)
{
	wait_event_interruptible(hp_racer_wq, hp_racer_go || kthread_should_stop());
	if (!kthread_should_stop())
		hp_sleep_wait();
	while (!kthread_should_stop())
		wait_event_interruptible(hp_spawn_wq, kthread_should_stop());
	return 0;
}

#define HP_BLOCKED_MAX 64
static DECLARE_WAIT_QUEUE_HEAD(hp_block_wq);
static int hp_unblocked;
static struct task_struct *hp_blocked[HP_BLOCKED_MAX];
static int hp_nr_blocked;

noinline int hp_block_wait(void)
{
	return wait_event_interruptible(hp_block_wq, READ_ONCE(hp_unblocked) || kthread_should_stop());
}

static int hp_blocked_fn(void *data)
{
	hp_block_wait();
	while (!kthread_should_stop())
		wait_event_interruptible(hp_spawn_wq, kthread_should_stop());
	return 0;
}

static int hp_forked_fn(void *data)
{
	hp_sleep_wait();
	while (!kthread_should_stop())
		wait_event_interruptible(hp_spawn_wq, kthread_should_stop());
	return 0;
}

static ssize_t hp_racer_write(struct file *f, const char __user *ubuf, size_t n, loff_t *off)
{
	char buf[16] = {};

	if (copy_from_user(buf, ubuf, min(n, sizeof(buf) - 1)))
		return -EFAULT;
	strim(buf);
	if (!strcmp(buf, "start") && !hp_racer) {
		hp_racer = kthread_run(hp_racer_fn, NULL, "hp_racer");
		if (IS_ERR(hp_racer)) {
			long err = PTR_ERR(hp_racer);

			hp_racer = NULL;
			return err;
		}
	} else if (!strcmp(buf, "enter") && hp_racer) {
		hp_racer_go = 1;
		wake_up_interruptible(&hp_racer_wq);
	} else if (!strcmp(buf, "fork") && !hp_forked) {
		hp_forked = kthread_run(hp_forked_fn, NULL, "hp_forked");
		if (IS_ERR(hp_forked)) {
			long err = PTR_ERR(hp_forked);

			hp_forked = NULL;
			return err;
		}
	} else if (!strncmp(buf, "block ", 6)) {
		unsigned int count, i;
		struct task_struct *t;

		if (kstrtouint(buf + 6, 10, &count) || count > HP_BLOCKED_MAX - hp_nr_blocked)
			return -EINVAL;
		WRITE_ONCE(hp_unblocked, 0);
		for (i = 0; i < count; i++) {
			t = kthread_run(hp_blocked_fn, NULL, "hp_blocked/%d", hp_nr_blocked);
			if (IS_ERR(t))
				return PTR_ERR(t);
			hp_blocked[hp_nr_blocked++] = t;
		}
	} else if (!strcmp(buf, "unblock")) {
		WRITE_ONCE(hp_unblocked, 1);
		wake_up_interruptible_all(&hp_block_wq);
	} else {
		return -EINVAL;
	}
	return n;
}

static int hp_open_target(struct inode *i, struct file *f) { return single_open(f, hp_target_show, NULL); }
static int hp_open_sleep(struct inode *i, struct file *f) { return single_open(f, hp_sleep_show, NULL); }
static int hp_open_bench(struct inode *i, struct file *f) { return single_open(f, hp_bench_show, NULL); }
static int hp_open_many(struct inode *i, struct file *f) { return single_open(f, hp_many_show, NULL); }
static int hp_open_spawn(struct inode *i, struct file *f) { return single_open(f, hp_spawn_show, NULL); }

static const struct proc_ops hp_target_ops = { .proc_open = hp_open_target, .proc_read = seq_read, .proc_release = single_release };
static const struct proc_ops hp_sleep_ops = { .proc_open = hp_open_sleep, .proc_read = seq_read, .proc_release = single_release };
static const struct proc_ops hp_wake_ops = { .proc_write = hp_wake_write };
static const struct proc_ops hp_bench_ops = { .proc_open = hp_open_bench, .proc_read = seq_read, .proc_write = hp_bench_write, .proc_release = single_release };
static const struct proc_ops hp_many_ops = { .proc_open = hp_open_many, .proc_read = seq_read, .proc_release = single_release };
static const struct proc_ops hp_spawn_ops = { .proc_open = hp_open_spawn, .proc_read = seq_read, .proc_write = hp_spawn_write, .proc_release = single_release };
static const struct proc_ops hp_racer_ops = { .proc_write = hp_racer_write };

static int __init hp_target_init(void)
{
	proc_create("hp_target", 0444, NULL, &hp_target_ops);
	proc_create("hp_sleep", 0444, NULL, &hp_sleep_ops);
	proc_create("hp_wake", 0222, NULL, &hp_wake_ops);
	proc_create("hp_bench", 0666, NULL, &hp_bench_ops);
	proc_create("hp_many", 0444, NULL, &hp_many_ops);
	hp_spawned = vzalloc(sizeof(*hp_spawned) * HP_SPAWN_MAX);
	if (hp_spawned)
		proc_create("hp_spawn", 0666, NULL, &hp_spawn_ops);
	proc_create("hp_racer", 0222, NULL, &hp_racer_ops);
	return 0;
}

static void __exit hp_target_exit(void)
{
	remove_proc_entry("hp_target", NULL);
	remove_proc_entry("hp_sleep", NULL);
	remove_proc_entry("hp_wake", NULL);
	remove_proc_entry("hp_bench", NULL);
	remove_proc_entry("hp_many", NULL);
	remove_proc_entry("hp_spawn", NULL);
	remove_proc_entry("hp_racer", NULL);
	while (hp_nr_spawned > 0)
		kthread_stop(hp_spawned[--hp_nr_spawned]);
	vfree(hp_spawned);
	/* hp_sleep_wait() sleepers leave once /proc/hp_wake is written. */
	if (hp_racer)
		kthread_stop(hp_racer);
	if (hp_forked)
		kthread_stop(hp_forked);
	while (hp_nr_blocked > 0)
		kthread_stop(hp_blocked[--hp_nr_blocked]);
}

module_init(hp_target_init);
module_exit(hp_target_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("hyperpatch test targets");
